"""Turn raw benchmark results into the summary, the issue's targets, Markdown and console output."""

from __future__ import annotations

import re

ORDER = ["none", "squid", "trafficserver", "tinyproxy", "egressgate", "egressgate-policy", "egressgate-protect",
         "egressgate-fleet", "egressgate-compiled", "egressgate-policy-compiled", "egressgate-protect-compiled"]


# ---------------------------------------------------------------------------- parsing


def _num(s: str) -> float:
    m = re.match(r"([\d.]+)([kKMG]?)", s)
    if not m:
        return 0.0
    return float(m.group(1)) * {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]


def _dur_ms(s: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", s)
    if not m:
        return 0.0
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[m.group(2)]


def parse_wrk(text: str) -> dict:
    out: dict = {}
    m = re.search(r"Requests/sec:\s*([\d.]+)", text)
    if m:
        out["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", text)
    if m:
        out["requests"] = int(m.group(1))
    m = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", text)
    if m:
        out["latency_avg_ms"] = _dur_ms(m.group(1))
        out["latency_max_ms"] = _dur_ms(m.group(3))
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    if m:
        out["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["socket_errors"] = dict(
            zip(["connect", "read", "write", "timeout"], map(int, m.groups()), strict=True)
        )
    return out


# ---------------------------------------------------------------------------- summary


def _get(d, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d or d[p] is None:
            return None
        d = d[p]
    return d


def digest(r: dict) -> dict:
    """The scalar figures of one run of a figure (for the run-to-run spread)."""
    out = {}
    if "rps" in r:
        out["rps"] = r["rps"]
    if "rate" in r:
        out["tunnels"] = r["rate"]
    if "q_us" in r:
        out["lat_p50_us"] = r["q_us"].get("p50")
    for d in ("up", "down"):
        if isinstance(r.get(d), dict):
            out[d] = r[d].get("MBps")
            out[f"cpu_{d}"] = r[d].get("cpu_us_per_op")
    if "cpu_us_per_op" in r:
        out["cpu"] = r["cpu_us_per_op"]
    return out


def _spread(fig: dict | None, key: str) -> tuple[float, float] | None:
    runs = [d.get(key) for d in (fig or {}).get("run_digests", [])]
    runs = [x for x in runs if x is not None]
    return (min(runs), max(runs)) if len(runs) > 1 else None


def row(results: dict, name: str) -> dict:
    peers = results["peers"]
    p = peers.get(name, {})
    r: dict = {"label": p.get("label", name)}
    if "rps" in p and "error" not in p["rps"]:
        r["rps"] = p["rps"].get("rps")
    r["up"] = _get(p, "throughput", "up", "MBps")
    r["down"] = _get(p, "throughput", "down", "MBps")
    t = p.get("tunnels") or {}
    if "rate" in t:
        r["tunnels"] = t["rate"]
        r["tunnel_p50_ms"] = _get(t, "total_ms", "p50")
        r["tunnel_p99_ms"] = _get(t, "total_ms", "p99")
        r["setup_p99_ms"] = _get(t, "setup_ms", "p99")
        r["tunnel_errors"] = sum((t.get("errors") or {}).values())
    base = _get(peers, "none", "latency", "q_us")
    q = _get(p, "latency", "q_us")
    if q:
        r["lat_p50_us"] = q.get("p50")
        r["lat_p99_us"] = q.get("p99")
        if base and name != "none":
            r["added_p50_us"] = q["p50"] - base["p50"]
            r["added_p99_us"] = q["p99"] - base["p99"]
        r["reconnects"] = _get(p, "latency", "reconnects")
    m = p.get("memory") or {}
    if "kib_per_tunnel_rss" in m:
        r["kib_rss"] = m["kib_per_tunnel_rss"]
        r["kib_pss"] = m["kib_per_tunnel_pss"]
        r["idle_n"] = m.get("idle_tunnels")
        r["max_alive"] = _get(m, "max", "alive")
        r["max_tried"] = _get(m, "max", "tried")
        r["max_rss_mib"] = (_get(m, "max", "rss_kib") or 0) / 1024
    # CPU the proxy's process tree spent per operation (µs; per MiB for CONNECT), and spreads
    r["cpu_req"] = _get(p, "rps", "cpu_us_per_op")
    r["cpu_tunnel"] = _get(p, "tunnels", "cpu_us_per_op")
    r["cpu_lat_req"] = _get(p, "latency", "cpu_us_per_op")
    for d in ("up", "down"):
        r[f"cpu_mib_{d}"] = _get(p, "throughput", d, "cpu_us_per_op")
    spread = {}
    for key, fig, k in (
        ("rps", "rps", "rps"),
        ("cpu_req", "rps", "cpu"),
        ("tunnels", "tunnels", "tunnels"),
        ("cpu_tunnel", "tunnels", "cpu"),
        ("up", "throughput", "up"),
        ("down", "throughput", "down"),
        ("cpu_mib_up", "throughput", "cpu_up"),
        ("cpu_mib_down", "throughput", "cpu_down"),
        ("lat_p50_us", "latency", "lat_p50_us"),
        ("cpu_lat_req", "latency", "cpu"),
    ):
        sp = _spread(p.get(fig) if isinstance(p.get(fig), dict) else None, k)
        if sp:
            spread[key] = sp
    r["spread"] = spread
    for st in m.get("steps", []):
        if st.get("kib_per_tunnel_rss") is not None:
            r[f"kib_rss_{st.get('target', st['idle_tunnels'])}"] = st["kib_per_tunnel_rss"]
    limits = {}
    for fig in ("rps", "latency"):
        if _get(p, fig, "limit"):
            limits[fig] = p[fig]["limit"]
    for d in ("up", "down"):
        if _get(p, "throughput", d, "limit"):
            limits[d] = p["throughput"][d]["limit"]
    if _get(p, "tunnels", "limit"):
        limits["tunnels"] = p["tunnels"]["limit"]
    r["limits"] = limits
    return r


HIGHER = ["rps", "up", "down", "tunnels"]  # higher is better
LOWER = ["tunnel_p99_ms", "added_p50_us", "added_p99_us", "kib_rss"]  # lower is better
CPU = ["cpu_req", "cpu_tunnel", "cpu_mib_up", "cpu_mib_down", "cpu_lat_req"]  # CPU µs per operation


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def targets_for(rows: dict, name: str) -> list[dict]:
    """The performance targets (issue 19; issue 6's that it does not restate are kept)."""
    r, sq, no = rows.get(name, {}), rows.get("squid", {}), rows.get("none", {})
    out = []

    def add(what, value, goal, ok, kind="ratio", spread=None):
        out.append(
            {
                "peer": name,
                "target": what,
                "measured": value,
                "goal": goal,
                "kind": kind,
                "spread": spread,
                "status": "n/a" if ok is None else ("pass" if ok else "FAIL"),
            }
        )

    def ge(a, b, k):
        x = _ratio(a, b)
        return x, (None if x is None else x >= k)

    def le(a, b, k):
        if a is None or b is None:
            return None, None
        if b <= 0:  # baseline at or below zero: compare absolute values
            return None, a <= b * k if b >= 0 else a <= 0
        return a / b, a <= b * k

    def ratio_spread(key, base):
        """The ratio's range when both sides were repeated (worst run against best, and back)."""
        a, b = r.get("spread", {}).get(key), base.get("spread", {}).get(key)
        if not a or not b or not b[0] or not b[1]:
            return None
        return (a[0] / b[1], a[1] / b[0])

    # issue 19: CPU per operation, from the proxy's own /proc time during each figure
    x, ok = le(r.get("cpu_req"), sq.get("cpu_req"), 0.5)
    add("CPU per forwarded request <= 0.5 x Squid's", x, 0.5, ok, spread=ratio_spread("cpu_req", sq))
    x, ok = le(r.get("cpu_tunnel"), sq.get("cpu_tunnel"), 0.6)
    add("CPU per tunnel set-up <= 0.6 x Squid's", x, 0.6, ok, spread=ratio_spread("cpu_tunnel", sq))
    x, ok = ge(r.get("rps"), sq.get("rps"), 2.0)
    add("req/s >= 2.0 x Squid", x, 2.0, ok, spread=ratio_spread("rps", sq))
    x, ok = ge(r.get("tunnels"), sq.get("tunnels"), 1.4)
    add("tunnels/s >= 1.4 x Squid", x, 1.4, ok, spread=ratio_spread("tunnels", sq))
    ts = rows.get("trafficserver", {})  # issue 27: ahead of Apache Traffic Server on both
    x, ok = ge(r.get("rps"), ts.get("rps"), 1.0)
    add("req/s > Traffic Server's", x, 1.0, ok, spread=ratio_spread("rps", ts))
    x, ok = ge(r.get("tunnels"), ts.get("tunnels"), 1.0)
    add("tunnels/s > Traffic Server's", x, 1.0, ok, spread=ratio_spread("tunnels", ts))
    for d in ("up", "down"):
        x, ok = ge(r.get(d), no.get(d), 0.6)
        add(f"CONNECT {d} >= 0.6 x no proxy", x, 0.6, ok, spread=ratio_spread(d, no))
        x, ok = ge(r.get(d), sq.get(d), 3.0)
        add(f"CONNECT {d} >= 3 x Squid", x, 3.0, ok, spread=ratio_spread(d, sq))
    for n in (500, 2000):
        k = r.get(f"kib_rss_{n}")
        add(f"<= 4 KiB RSS per idle tunnel at {n:,}", k, 4.0, None if k is None else k <= 4.0, kind="kib")
    # issue 6's, kept
    x, ok = le(r.get("tunnel_p99_ms"), sq.get("tunnel_p99_ms"), 1.0)
    add("tunnel p99 <= Squid's", x, 1.0, ok)
    for q in ("p50", "p99"):
        x, ok = le(r.get(f"added_{q}_us"), sq.get(f"added_{q}_us"), 0.5)
        add(f"added latency {q} <= 0.5 x Squid", x, 0.5, ok)
    m = r.get("max_alive")
    add("20,000 concurrent idle tunnels held", m, 20000, None if m is None else m >= 20000, kind="count")
    if name.endswith("-policy"):
        off = rows.get(name[: -len("-policy")], {})
        for key in HIGHER:
            x, ok = ge(r.get(key), off.get(key), 0.9)
            add(f"policy on: {key} >= 0.9 x policy off", x, 0.9, ok, spread=ratio_spread(key, off))
        for key in LOWER + CPU:
            x, ok = le(r.get(key), off.get(key), 1.1)
            add(f"policy on: {key} <= 1.1 x policy off", x, 1.1, ok, spread=ratio_spread(key, off))
    if name.endswith("-protect"):  # shared-IP protection on top of the policy: a bounded cost
        base = rows.get(name[: -len("-protect")] + "-policy", {})
        for key in HIGHER:
            x, ok = ge(r.get(key), base.get(key), 0.95)
            add(f"protect on: {key} >= 0.95 x policy", x, 0.95, ok, spread=ratio_spread(key, base))
    return out


def summarize(results: dict) -> dict:
    names = [n for n in ORDER if n in results["peers"]] + [n for n in results["peers"] if n not in ORDER]
    rows = {n: row(results, n) for n in names if "skipped" not in results["peers"][n]}
    ratios = {}
    for n, r in rows.items():
        ratios[n] = {}
        for base in ("squid", "none"):
            if base == n or base not in rows:
                continue
            b = rows[base]
            ratios[n][f"vs_{base}"] = {k: _ratio(r.get(k), b.get(k)) for k in HIGHER + ["tunnel_p99_ms"]}
            if base == "squid":
                for k in ("added_p50_us", "added_p99_us", "kib_rss"):
                    ratios[n][f"vs_{base}"][k] = _ratio(r.get(k), b.get(k))
    targets = []
    for n in rows:
        if n.startswith("egressgate"):
            targets += targets_for(rows, n)
    return {"rows": rows, "ratios": ratios, "targets": targets}


# ---------------------------------------------------------------------------- formatting


def f0(x, suffix=""):
    return "—" if x is None else f"{x:,.0f}{suffix}"


def f1(x):
    return "—" if x is None else f"{x:,.1f}"


def f2(x):
    return "—" if x is None else f"{x:.2f}"


def signed(x):
    return "—" if x is None else f"{x:+,.0f}"


def one_line(fig: str, r: dict | None) -> str:
    try:
        return _one_line(fig, r)
    except (KeyError, TypeError, ValueError) as e:
        return f"(cannot summarise: {type(e).__name__}: {e})"


def _one_line(fig: str, r: dict | None) -> str:
    if r is None:
        return "no result"
    if "error" in r:
        return "ERROR " + r["error"]
    if fig == "rps":
        w = f"  ({r['warning']})" if r.get("warning") else ""
        return f"{f0(r.get('rps'))} req/s; limit: {r.get('limit')}{w}"
    if fig == "throughput":
        u, d = r["up"], r["down"]
        bad = "" if u.get("ok") and d.get("ok") else "  (INCOMPLETE transfer)"
        return (
            f"up {f0(u['MBps'])} MB/s [{u.get('limit')}] / down {f0(d['MBps'])} MB/s [{d.get('limit')}]{bad}"
        )
    if fig == "tunnels":
        e = sum(r["errors"].values())
        return (
            f"{f0(r['rate'])}/s p50 {f2(r['total_ms'].get('p50'))} ms p99 {f2(r['total_ms'].get('p99'))} ms"
            f"{f' errors {e}' if e else ''}; loadgen CPU {r['client_cpu_pct']:.0f}%; limit: {r['limit']}"
        )
    if fig == "latency":
        q = r["q_us"]
        return f"p50 {f0(q.get('p50'))} µs p99 {f0(q.get('p99'))} µs over {r['requests']} requests" + (
            f", reconnects {r['reconnects']}" if r.get("reconnects") else ""
        )
    if fig == "memory":
        mx = r.get("max", {})
        return (
            f"{f1(r.get('kib_per_tunnel_rss'))} KiB RSS / {f1(r.get('kib_per_tunnel_pss'))} KiB PSS per idle tunnel "
            f"({r.get('idle_tunnels')}); held {mx.get('alive')}/{mx.get('tried')} "
            f"at {f0((mx.get('rss_kib') or 0) / 1024)} MiB RSS"
        )
    return str(r)


def _tunnels_cell(r):
    if r.get("tunnels") is None:
        return "—"
    return f"{f0(r['tunnels'])} ({f2(r.get('tunnel_p50_ms'))} / {f2(r.get('tunnel_p99_ms'))})"


def table(results: dict) -> str:
    s = results["summary"]
    lines = [
        "| | req/s | CONNECT MB/s up / down | tunnels/s (p50 / p99 ms) | latency p50 / p99 µs "
        "(added) | KiB per idle tunnel RSS / PSS | idle tunnels held (RSS MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, r in s["rows"].items():
        lat = "—"
        if r.get("lat_p50_us") is not None:
            lat = f"{f0(r['lat_p50_us'])} / {f0(r['lat_p99_us'])}"
            if n != "none" and r.get("added_p50_us") is not None:
                lat += f" ({signed(r['added_p50_us'])} / {signed(r['added_p99_us'])})"
        held = "—"
        if r.get("max_alive") is not None:
            held = f"{r['max_alive']:,} of {r['max_tried']:,} ({f0(r.get('max_rss_mib'))})"
        mem = "—" if r.get("kib_rss") is None else f"{f1(r['kib_rss'])} / {f1(r['kib_pss'])}"
        lines.append(
            f"| {r['label']} | {f0(r.get('rps'))} | {f0(r.get('up'))} / {f0(r.get('down'))} | "
            f"{_tunnels_cell(r)} | {lat} | {mem} | {held} |"
        )
    return "\n".join(lines)


def ratio_table(results: dict) -> str:
    s = results["summary"]
    lines = [
        "| | vs | req/s | up | down | tunnels/s | tunnel p99 | added p50 | added p99 | KiB/tunnel |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, rs in s["ratios"].items():
        for base, v in rs.items():
            lines.append(
                f"| {s['rows'][n]['label']} | {'Squid' if base == 'vs_squid' else 'no proxy'} | "
                + " | ".join(
                    f2(v.get(k)) + ("×" if v.get(k) is not None else "")
                    for k in (
                        "rps",
                        "up",
                        "down",
                        "tunnels",
                        "tunnel_p99_ms",
                        "added_p50_us",
                        "added_p99_us",
                        "kib_rss",
                    )
                )
                + " |"
            )
    return "\n".join(lines)


def limits_table(results: dict) -> str:
    s = results["summary"]
    lines = ["| | req/s | CONNECT up | CONNECT down | tunnels/s | latency |", "|---|---|---|---|---|---|"]
    for _n, r in s["rows"].items():
        lim = r.get("limits", {})
        lines.append(
            f"| {r['label']} | "
            + " | ".join(lim.get(k, "—") for k in ("rps", "up", "down", "tunnels", "latency"))
            + " |"
        )
    return "\n".join(lines)


def targets_table(results: dict) -> str:
    t = results["summary"]["targets"]
    if not t:
        return "_egressgate was not measured in this run; no targets evaluated._"
    lines = ["| peer | target | measured (run-to-run range) | status |", "|---|---|---|---|"]
    for x in t:
        m = x["measured"]
        kind = x.get("kind", "ratio")
        if m is None:
            ms = "—"
        elif kind == "kib":
            ms = f"{m:.1f} KiB"
        elif kind == "count":
            ms = f"{m:,.0f}"
        else:
            ms = f"{m:.2f}×"
        if x.get("spread"):
            lo, hi = x["spread"]
            ms += f" ({lo:.2f}–{hi:.2f})"
        lines.append(f"| {x['peer']} | {x['target']} | {ms} | {x['status']} |")
    return "\n".join(lines)


def cpu_table(results: dict) -> str:
    """CPU the proxy spent per operation (user + system of its process tree, from /proc)."""
    s = results["summary"]
    sq = s["rows"].get("squid", {})

    def cell(r, key):
        v = r.get(key)
        if v is None:
            return "—"
        out = f"{v:,.0f}" if v >= 10 else f"{v:,.1f}"
        sp = r.get("spread", {}).get(key)
        if sp:
            out += f" ({sp[0]:,.0f}–{sp[1]:,.0f})"
        if r is not sq and sq.get(key):
            out += f" · {v / sq[key]:.2f}×"
        return out

    lines = [
        "| | µs per forwarded request | µs per tunnel set-up | µs per MiB CONNECT up / down | "
        "µs per request (latency run) |",
        "|---|---|---|---|---|",
    ]
    for n, r in s["rows"].items():
        if n == "none":
            continue
        lines.append(
            f"| {r['label']} | {cell(r, 'cpu_req')} | {cell(r, 'cpu_tunnel')} | "
            f"{cell(r, 'cpu_mib_up')} / {cell(r, 'cpu_mib_down')} | {cell(r, 'cpu_lat_req')} |"
        )
    return "\n".join(lines)


def notes(results: dict) -> list[str]:
    out = []
    for n, p in results["peers"].items():
        if "skipped" in p:
            out.append(f"{p.get('label', n)}: skipped — {p['skipped']}")
        if "error" in p:
            out.append(f"{p.get('label', n)}: {p['error']}")
        for fig in ("rps", "throughput", "tunnels", "latency", "memory"):
            r = p.get(fig)
            if isinstance(r, dict) and "error" in r:
                out.append(f"{p.get('label', n)} {fig}: {r['error']}")
            if isinstance(r, dict) and r.get("warning"):
                out.append(f"{p.get('label', n)} {fig}: {r['warning']}")
        t = p.get("tunnels")
        if isinstance(t, dict) and t.get("errors"):
            out.append(f"{p.get('label', n)} tunnels: errors {t['errors']}")
        lat = p.get("latency")
        if isinstance(lat, dict) and lat.get("reconnects"):
            out.append(
                f"{p.get('label', n)} latency: the proxy closed the keep-alive connection "
                f"{lat['reconnects']} times (reconnect time is included)"
            )
        m = p.get("memory")
        if isinstance(m, dict) and m.get("max", {}).get("open_errors"):
            out.append(
                f"{p.get('label', n)} idle tunnels: open errors {m['max']['open_errors']} "
                f"(per-process fd hard limit {m.get('nofile_limit')})"
            )
        if isinstance(m, dict) and m.get("max") and m.get("nofile_limit"):
            mx, lim = m["max"], m["nofile_limit"]
            per_proc = (lim - 64) // 2
            if (mx.get("alive") or 0) < mx["tried"] and mx.get("processes", 1) * per_proc < mx["tried"]:
                out.append(
                    f"{p.get('label', n)} idle tunnels: a tunnel takes 2 fds in the proxy and this machine's "
                    f"RLIMIT_NOFILE hard limit is {lim:,} per process (not raisable here), so "
                    f"{mx.get('processes', 1)} process(es) can hold at most ~{mx.get('processes', 1) * per_proc:,}; "
                    f"{mx['tried']:,} needs several worker processes or a higher hard limit"
                )
        for note in p.get("notes", []):
            out.append(f"{p.get('label', n)}: {note}")
    return out


def header(results: dict) -> str:
    m = results["meta"]
    mc = m["machine"]
    vers = ", ".join(f"{p.get('label')}" for n, p in results["peers"].items() if n != "none")
    return (
        f"{m['date']} · {mc['nproc']} × {mc['cpu_model']} · {mc['mem_mib']:,} MiB · Linux {mc['kernel']} · "
        f"{m['mode']} run · nginx {m['versions']['nginx']}, wrk {m['versions']['wrk']}, "
        f"Python {m['versions']['python']} · peers: {vers}"
    )


def markdown(results: dict) -> str:
    st = results["meta"]["settings"]
    parts = [
        "# egressgate benchmark — latest run",
        "",
        header(results),
        "",
        table(results),
        "",
        f"req/s: wrk, {st['wrk_threads']} threads, {st['wrk_connections']} keep-alive connections, "
        f"{st['rps_seconds']} s, absolute-URI GET of a {st['origin_body_bytes']}-byte nginx body. "
        f"CONNECT: one tunnel moving {st['bulk_bytes'] / 2**20:,.0f} MiB each way to a loopback sink. "
        f"tunnels/s: {st['tunnel_workers']} workers over {st['tunnel_loadgen_processes']} processes for "
        f"{st['tunnel_seconds']} s, each connect → CONNECT → 200 → 16-byte echo → close; latency is connect() "
        f"to echo received. latency: one keep-alive connection, {st['latency_requests']} sequential GETs; added = "
        f"proxy minus no proxy. Idle tunnels: growth of the peer's process-tree RSS/PSS "
        f"(smaps_rollup) with {st['idle_tunnels']:,} idle tunnels; then up to {st['max_tunnels']:,} "
        f"(per-process fd hard limit here: {st['nofile_hard_limit']:,}).",
        "",
        "## What limited each figure (CPU of each process during the figure; saturated = ≥ 88% of its cores)",
        "",
        limits_table(results),
        "",
        "## Ratios",
        "",
        ratio_table(results),
        "",
        "## CPU per operation (the proxy's process tree, user + system, from /proc; × = vs Squid)",
        "",
        cpu_table(results),
        "",
        "## Targets (issue 19; issue 6's latency, p99 and capacity targets kept)",
        "",
        targets_table(results),
        "",
    ]
    if results.get("socks"):
        from socks_figure import markdown as socks_markdown

        parts += socks_markdown(results["socks"])
    n = notes(results)
    if n:
        parts += ["## Notes", ""] + [f"- {x}" for x in n] + [""]
    return "\n".join(parts)


def console(results: dict) -> str:
    return "\n".join(
        [
            header(results),
            "",
            table(results),
            "",
            "What limited each figure:",
            limits_table(results),
            "",
            "Ratios:",
            ratio_table(results),
            "",
            "CPU per operation (µs; × = vs Squid):",
            cpu_table(results),
            "",
            "Targets:",
            targets_table(results),
            *(["", "Notes:"] + [f"- {x}" for x in notes(results)] if notes(results) else []),
        ]
    )
