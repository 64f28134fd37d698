#!/usr/bin/env python3
"""Side-by-side benchmark of egressgate, Squid, tinyproxy and the no-proxy path (issue 6), and
of egressgate's SOCKS5 listener with Dante (figure ``socks``, bench/socks_figure.py).

    .venv/bin/python bench/run.py [--quick] [--only rps,throughput,tunnels,latency,memory,socks]
                                  [--peers squid,tinyproxy,egressgate,egressgate-policy]
                                  [--egressgate-workers N] [--repeat N]

Everything runs on 127.0.0.0/8 on this machine: an nginx origin, a bulk sink/source, echo servers,
the load generators (wrk, bench/loadgen.py) and each peer in turn, all in the same run, so the
ratios between peers are what to compare (absolute figures drift between runs and machines).
Results: bench/results/latest.json and bench/results/latest.md (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
import socks_figure  # noqa: E402
from peers import (  # noqa: E402
    BODY,
    Env,
    NoProxy,
    Peer,
    ensure_packages,
    make_peers,
    start_nginx,
    version_of,
    which,
)
from procs import (  # noqa: E402
    NCPU,
    CpuWindow,
    Proc,
    Registry,
    add_loadgen_cpu,
    cpu_us_per_op,
    free_ports,
    memory_of,
    verdict,
)

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
PY = sys.executable
LOADGEN = str(BENCH / "loadgen.py")
SERVERS = str(BENCH / "servers.py")
FIGURES = ["rps", "throughput", "tunnels", "latency", "memory", "socks"]
PEER_FIGURES = FIGURES[:5]  # per peer; "socks" runs once with its own peers (egressgate socks5, Dante)
ECHO_PORTS = 8  # several destination ports spread the proxies' outbound 4-tuples
ECHO_PROCS = 3  # SO_REUSEPORT processes behind those ports (fd limit per process; CPU)
HOLDERS = 4  # processes holding idle tunnels (each under the per-process fd limit)
SOURCES = [f"127.0.0.{i}" for i in range(2, 34)]  # client source addresses for idle tunnels


def log(msg: str) -> None:
    print(msg, flush=True)


class Bench:
    def __init__(self, args):
        self.a = args
        self.reg = Registry()
        self.tmp = Path(tempfile.mkdtemp(prefix="egressgate-bench-"))
        os.chmod(self.tmp, 0o755)
        self.results: dict = {}
        self.env: Env | None = None
        self.servers: dict[str, Proc] = {}
        self.echo_procs: list[Proc] = []
        self.deadline = time.monotonic() + args.max_minutes * 60

    # ------------------------------------------------------------------ setup

    def start_far_ends(self) -> None:
        origin, sink, *echo = free_ports(2 + ECHO_PORTS)
        self.env = Env(self.tmp, origin, sink, echo)
        self.servers["origin"] = start_nginx(self.reg, self.tmp, origin)
        s = self.reg.start(
            "sink",
            [PY, SERVERS, "sink", "--port", str(sink)],
            role="sink",
            capacity=1,
            stdout=subprocess.PIPE,
            log=str(self.tmp / "sink.log"),
        )
        self._await_ready(s, "sink")
        self.servers["sink"] = s
        for i in range(ECHO_PROCS):
            e = self.reg.start(
                f"echo{i}",
                [PY, SERVERS, "echo", "--reuseport", "--ports", ",".join(map(str, echo))],
                role="echo",
                capacity=1,
                stdout=subprocess.PIPE,
                log=str(self.tmp / f"echo{i}.log"),
            )
            self._await_ready(e, "echo")
            self.echo_procs.append(e)

    def _await_ready(self, p: Proc, what: str, timeout: float = 15.0) -> str:
        r, _, _ = select.select([p.popen.stdout], [], [], timeout)
        line = p.popen.stdout.readline().decode() if r else ""
        if not line:
            raise RuntimeError(f"{what} did not become ready (see {p.log})")
        return line

    # ------------------------------------------------------------------ helpers

    def loadgen(self, argv: list[str], name: str, timeout: float) -> tuple[dict, Proc]:
        out = self.tmp / f"{name}.{time.monotonic_ns()}.json"
        with open(out, "wb") as f:
            p = self.reg.start(
                name, [PY, LOADGEN, *argv], role="loadgen", stdout=f, log=str(self.tmp / "loadgen.log")
            )
        if self.reg.wait(p, timeout) is None:
            self.reg.stop(p)
            raise RuntimeError(f"{name} did not finish in {timeout:.0f}s")
        text = out.read_text().strip()
        out.unlink(missing_ok=True)
        if not text:
            raise RuntimeError(
                f"{name} printed nothing (exit {p.popen.returncode}); see {self.tmp}/loadgen.log"
            )
        return json.loads(text.splitlines()[-1]), p

    def window(self, peer: Peer, far: str) -> CpuWindow:
        procs = {far: self.servers[far]} if far != "echo" else {}
        if far == "echo":
            # one combined role for the echo processes: CPU summed, capacity = their count
            procs = {f"echo{i}": e for i, e in enumerate(self.echo_procs)}
        if peer.proc is not None:
            procs["proxy"] = peer.proc
        return CpuWindow(procs).start()

    @staticmethod
    def merge_echo(win: dict) -> dict:
        roles = win["roles"]
        echo = [roles.pop(k) for k in list(roles) if k.startswith("echo")]
        if echo:
            roles["echo"] = {
                "name": "echo",
                "cpu_pct": sum(e["cpu_pct"] for e in echo),
                "capacity_cores": min(NCPU, len(echo)),
            }
        return win

    def proxy_args(self, peer: Peer) -> list[str]:
        if peer.proc is None:
            return []
        out = ["--proxy", f"127.0.0.1:{peer.port}"]
        if peer.auth:
            out += ["--auth", peer.auth]
        return out

    def repeat(self, fn, key):
        """Run fn --repeat times; keep the run with the median key, and every run's figures
        (``report.digest``) so the report can show the run-to-run spread."""
        runs = [fn() for _ in range(self.a.repeat)]
        runs = [r for r in runs if r is not None]
        if not runs:
            return None
        runs.sort(key=key)
        best = runs[len(runs) // 2]
        if len(runs) > 1:
            best["runs"] = [key(r) for r in runs]
            best["run_digests"] = [report.digest(r) for r in runs]
        return best

    # ------------------------------------------------------------------ figures

    def fig_rps(self, peer: Peer) -> dict:
        env = self.env
        origin = f"127.0.0.1:{env.origin_port}"
        lua = self.tmp / f"wrk-{peer.name}.lua"
        lines = []
        if peer.proc is not None:
            lines.append(f'wrk.path = "http://{origin}/"')
        lines.append(f'wrk.headers["Host"] = "{origin}"')
        if peer.auth:
            import base64

            lines.append(
                f'wrk.headers["Proxy-Authorization"] = "Basic {base64.b64encode(peer.auth.encode()).decode()}"'
            )
        lua.write_text("\n".join(lines) + "\n")
        url = f"http://127.0.0.1:{peer.port}/" if peer.proc is not None else f"http://{origin}/"
        dur = self.a.rps_seconds
        win = self.window(peer, "origin")
        out_path = self.tmp / "wrk.out"
        with open(out_path, "wb") as f:
            p = self.reg.start(
                "wrk",
                [
                    which("wrk"),
                    "-t",
                    str(NCPU),
                    "-c",
                    "50",
                    "-d",
                    f"{dur}s",
                    "--timeout",
                    "5s",
                    "-s",
                    str(lua),
                    url,
                ],
                role="loadgen",
                stdout=f,
                log=str(self.tmp / "wrk.err"),
            )
        if self.reg.wait(p, dur + 30) is None:
            self.reg.stop(p)
            raise RuntimeError("wrk did not finish")
        w = win.stop()
        add_loadgen_cpu(w, "wrk", [p], NCPU)
        text = out_path.read_text()
        res = report.parse_wrk(text)
        res["limit"] = verdict(w)
        res["cpu"] = w
        res["cpu_us_per_op"] = cpu_us_per_op(w, res.get("requests"))
        if res.get("non2xx") or res.get("socket_errors"):
            res["warning"] = f"non-2xx {res.get('non2xx', 0)}, socket errors {res.get('socket_errors')}"
        if not res.get("rps"):
            res["raw"] = text[-2000:]
        return res

    def fig_throughput(self, peer: Peer) -> dict:
        out = {}
        for d in ("up", "down"):
            win = self.window(peer, "sink")
            res, p = self.loadgen(
                [
                    "throughput",
                    *self.proxy_args(peer),
                    "--target",
                    f"127.0.0.1:{self.env.sink_port}",
                    "--dir",
                    d,
                    "--bytes",
                    str(self.a.bulk_bytes),
                ],
                f"throughput-{d}",
                timeout=300,
            )
            w = win.stop()
            add_loadgen_cpu(w, "client", [p], 1)
            res["limit"] = verdict(w)
            res["cpu"] = w
            # CPU per MiB relayed (µs), the bulk path's cost per unit of work
            res["cpu_us_per_op"] = cpu_us_per_op(w, res.get("bytes", 0) / 2**20)
            out[d] = res
        return out

    def fig_tunnels(self, peer: Peer) -> dict:
        procs_n = self.a.tunnel_procs
        workers = 50
        per = [workers // procs_n + (1 if i < workers % procs_n else 0) for i in range(procs_n)]
        targets = ",".join(f"127.0.0.1:{p}" for p in self.env.echo_ports)
        start_at = time.time() + 1.0
        dur = self.a.tunnel_seconds
        win = self.window(peer, "echo")
        ps, files = [], []
        for i, n in enumerate(per):
            f = self.tmp / f"tunnels{i}.json"
            files.append(f)
            with open(f, "wb") as fh:
                ps.append(
                    self.reg.start(
                        f"tunnels{i}",
                        [
                            PY,
                            LOADGEN,
                            "tunnels",
                            *self.proxy_args(peer),
                            "--targets",
                            targets,
                            "--workers",
                            str(n),
                            "--duration",
                            str(dur),
                            "--start-at",
                            f"{start_at:.3f}",
                            "--raw",
                        ],
                        role="loadgen",
                        stdout=fh,
                        log=str(self.tmp / "loadgen.log"),
                    )
                )
        for p in ps:
            if self.reg.wait(p, dur + 60) is None:
                self.reg.stop(p)
        w = self.merge_echo(win.stop())
        # the window includes the 1 s start delay (an idle proxy); scale CPU % to the measured
        # interval below; CPU seconds (and so CPU per tunnel) need no scaling
        add_loadgen_cpu(w, f"loadgen ({procs_n} proc)", ps, procs_n)
        parts = []
        for f in files:
            t = f.read_text().strip()
            if t:
                parts.append(json.loads(t.splitlines()[-1]))
        if not parts:
            raise RuntimeError("tunnel load generators printed nothing")
        total = [x for p in parts for x in p["lat_total_us"]]
        setup = [x for p in parts for x in (p["lat_200_us"] or [])]
        elapsed = max(p["elapsed"] for p in parts)
        errors: dict[str, int] = {}
        for p in parts:
            for k, v in p["errors"].items():
                errors[k] = errors.get(k, 0) + v
        from loadgen import quantiles

        # CPU % over the measured interval rather than the window with its start delay
        scale = w["wall_s"] / elapsed if elapsed else 1.0
        for r in w["roles"].values():
            r["cpu_pct"] *= scale
        res = {
            "count": len(total),
            "rate": len(total) / elapsed if elapsed else 0.0,
            "elapsed": elapsed,
            "errors": errors,
            "total_ms": {k: v / 1000 for k, v in quantiles(total).items()},
            "setup_ms": {k: v / 1000 for k, v in quantiles(setup).items()} if setup else None,
            "client_cpu_pct": sum(p["client_cpu_pct"] for p in parts),
            "workers": workers,
            "loadgen_processes": procs_n,
        }
        res["limit"] = verdict(w)
        res["cpu"] = w
        res["cpu_us_per_op"] = cpu_us_per_op(w, len(total))
        return res

    def fig_latency(self, peer: Peer) -> dict:
        win = self.window(peer, "origin")
        res, p = self.loadgen(
            [
                "latency",
                *self.proxy_args(peer),
                "--target",
                f"127.0.0.1:{self.env.origin_port}",
                "--requests",
                str(self.a.latency_requests),
            ],
            "latency",
            timeout=120,
        )
        w = win.stop()
        add_loadgen_cpu(w, "client", [p], 1)
        res["limit"] = verdict(w)
        res["cpu"] = w
        res["cpu_us_per_op"] = cpu_us_per_op(w, res.get("requests"))
        return res

    def fig_memory(self, peer: Peer) -> dict:
        """Fresh peer; RSS/PSS growth of its process tree with N idle tunnels; then as many as it holds."""
        peer.stop(self.reg)
        time.sleep(0.5)
        peer.start(self.reg, self.env)
        targets = ",".join(f"127.0.0.1:{p}" for p in self.env.echo_ports)
        holders = []
        srcs = [SOURCES[i::HOLDERS] for i in range(HOLDERS)]
        try:
            for i in range(HOLDERS):
                h = self.reg.start(
                    f"holder{i}",
                    [
                        PY,
                        LOADGEN,
                        "hold",
                        *self.proxy_args(peer),
                        "--targets",
                        targets,
                        "--sources",
                        ",".join(srcs[i]),
                        "--lifetime",
                        "900",
                        "--max-seconds",
                        str(self.a.hold_open_seconds),
                    ],
                    role="loadgen",
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    log=str(self.tmp / "holder.log"),
                )
                holders.append(h)
            for h in holders:
                json.loads(self._await_ready(h, "holder"))

            def ask(cmd_for, timeout):
                for i, h in enumerate(holders):
                    h.popen.stdin.write((cmd_for(i) + "\n").encode())
                    h.popen.stdin.flush()
                answers = []
                for h in holders:
                    answers.append(json.loads(self._await_ready(h, "holder", timeout)))
                return answers

            def share(total, i):
                return total // HOLDERS + (1 if i < total % HOLDERS else 0)

            # warm-up: lazy initialisation, pools, first allocations; these 200 stay open and are
            # part of the baseline, so the growth measured is that of the next N tunnels
            ask(lambda i: f"open {share(200, i)}", 60)
            warm = ask(lambda i: "check", 60)
            base_held = sum(a["held"] for a in warm)
            time.sleep(1.0)
            m0 = memory_of(peer.proc.tree())
            # the growth is measured at each step (500, then --idle-tunnels): a per-tunnel cost
            # that only looks small at one count (a fixed arena amortised) shows at the other
            steps = []
            for n in sorted({min(500, self.a.idle_tunnels), self.a.idle_tunnels}):
                a1 = ask(lambda i, n=n: f"open {share(base_held + n, i)}", self.a.hold_open_seconds + 30)
                held1 = sum(a["held"] for a in a1) - base_held
                time.sleep(1.0)
                m1 = memory_of(peer.proc.tree())
                steps.append(
                    {
                        "target": n,
                        "idle_tunnels": held1,
                        "with_idle": m1,
                        "kib_per_tunnel_rss": (m1["rss_kib"] - m0["rss_kib"]) / held1 if held1 else None,
                        "kib_per_tunnel_pss": (m1["pss_kib"] - m0["pss_kib"]) / held1 if held1 else None,
                    }
                )
            res = {"baseline": m0, "steps": steps, **steps[-1]}
            target = self.a.max_tunnels
            a2 = ask(lambda i: f"open {share(base_held + target, i)}", self.a.hold_open_seconds + 30)
            errs: dict[str, int] = {}
            for a in a2:
                for k, v in a["errors"].items():
                    errs[k] = errs.get(k, 0) + v
            time.sleep(1.0)
            chk = ask(lambda i: "check", 60)
            m2 = memory_of(peer.proc.tree())
            res["max"] = {
                "tried": target,
                "opened": sum(a["held"] for a in a2) - base_held,
                "alive": sum(a["alive"] for a in chk) - base_held,
                "open_errors": errs,
                "rss_kib": m2["rss_kib"],
                "pss_kib": m2["pss_kib"],
                "processes": m2["processes"],
            }
            res["nofile_limit"] = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            return res
        finally:
            for h in holders:
                try:
                    h.popen.stdin.write(b"close\n")
                    h.popen.stdin.flush()
                except OSError:
                    pass
            for h in holders:
                if self.reg.wait(h, 15) is None:
                    self.reg.stop(h)

    # ------------------------------------------------------------------ driver

    def run_peer(self, peer: Peer) -> dict:
        out: dict = {"label": peer.label, "version": peer.version}
        why = peer.unavailable()
        if why:
            log(f"== {peer.label}: skipped: {why}")
            out["skipped"] = why
            return out
        log(f"== {peer.label}")
        try:
            if peer.proc is None and not isinstance(peer, NoProxy):
                peer.start(self.reg, self.env)
            figs = [f for f in self.a.only
                    if f in PEER_FIGURES and not (f == "memory" and isinstance(peer, NoProxy))]
            for fig in figs:
                if time.monotonic() > self.deadline:
                    out.setdefault("skipped_figures", []).append(fig)
                    log(f"   {fig}: skipped (--max-minutes reached)")
                    continue
                t0 = time.monotonic()
                try:
                    if fig == "rps":
                        r = self.repeat(lambda: self.fig_rps(peer), key=lambda r: r.get("rps", 0))
                    elif fig == "throughput":
                        r = self.repeat(
                            lambda: self.fig_throughput(peer),
                            key=lambda r: r["up"]["MBps"] + r["down"]["MBps"],
                        )
                    elif fig == "tunnels":
                        r = self.repeat(lambda: self.fig_tunnels(peer), key=lambda r: r["rate"])
                    elif fig == "latency":
                        r = self.repeat(lambda: self.fig_latency(peer), key=lambda r: r["q_us"].get("p50", 0))
                    else:
                        r = self.fig_memory(peer)
                except Exception as e:  # one failed figure must not lose the others
                    r = {"error": f"{type(e).__name__}: {e}"}
                out[fig] = r
                log(f"   {fig:<10} {report.one_line(fig, r)}  [{time.monotonic() - t0:.0f}s]")
                if peer.proc is not None and peer.proc.popen.poll() is not None:
                    log(f"   {peer.label} exited (code {peer.proc.popen.returncode}); restarting")
                    peer.notes.append(f"exited during {fig}")
                    peer.proc = None
                    peer.start(self.reg, self.env)
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {e}"
            log(f"   error: {out['error']}")
        finally:
            peer.stop(self.reg)
            if peer.notes:
                out["notes"] = peer.notes
            out["version"] = peer.version
            out["label"] = peer.label
        return out

    def run(self) -> dict:
        a = self.a
        peers: list[Peer] = [NoProxy(), *make_peers(a.peers, a.egressgate_workers)]
        ensure_packages({"wrk", "nginx", *(p.name for p in peers if p.name in ("squid", "tinyproxy")),
                         *(["danted"] if "socks" in a.only else [])}, log)
        for b in ("wrk", "nginx"):
            if not which(b):
                raise SystemExit(f"{b} is required (apt-get install {b})")
        self.start_far_ends()
        meta = machine_info()
        meta.update(
            {
                "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "mode": "quick" if a.quick else "full",
                "settings": {
                    "rps_seconds": a.rps_seconds,
                    "wrk_connections": 50,
                    "wrk_threads": NCPU,
                    "bulk_bytes": a.bulk_bytes,
                    "tunnel_seconds": a.tunnel_seconds,
                    "tunnel_workers": 50,
                    "tunnel_loadgen_processes": a.tunnel_procs,
                    "latency_requests": a.latency_requests,
                    "idle_tunnels": a.idle_tunnels,
                    "max_tunnels": a.max_tunnels,
                    "repeat": a.repeat,
                    "egressgate_workers": a.egressgate_workers,
                    "origin_body_bytes": len(BODY),
                    "echo_ports": ECHO_PORTS,
                    "echo_processes": ECHO_PROCS,
                    "holder_processes": HOLDERS,
                    "nofile_hard_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
                },
                "versions": {
                    "nginx": version_of(["nginx", "-v"], r"nginx/(\S+)"),
                    "wrk": version_of(["wrk", "--version"], r"wrk (\S+)"),
                    "python": platform.python_version(),
                },
            }
        )
        self.results = {"meta": meta, "peers": {}}
        if any(f in PEER_FIGURES for f in a.only):
            for peer in peers:
                self.results["peers"][peer.name] = self.run_peer(peer)
        if "socks" in a.only:
            log("== SOCKS5: egressgate socks5 listener, Dante, egressgate CONNECT")
            try:
                self.results["socks"] = socks_figure.figure(a.tunnel_seconds, a.bulk_bytes, log=log)
            except Exception as e:  # the other figures stand
                self.results["socks"] = {"error": f"{type(e).__name__}: {e}"}
                log(f"   error: {self.results['socks']['error']}")
        self.results["summary"] = report.summarize(self.results)
        return self.results

    def close(self) -> None:
        self.reg.stop_all()
        if self.a.keep_tmp:
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def machine_info() -> dict:
    model, mem = "?", 0
    try:
        model = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            "?",
        )
        mem = next(
            (
                int(ln.split()[1]) // 1024
                for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal:")
            ),
            0,
        )
    except OSError:
        pass
    return {"machine": {"nproc": NCPU, "cpu_model": model, "kernel": platform.release(), "mem_mib": mem}}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs (256 MiB bulk, 4 s loads): ~4 minutes")
    ap.add_argument(
        "--only", default=",".join(FIGURES), help=f"figures to run, comma-separated: {','.join(FIGURES)}"
    )
    ap.add_argument(
        "--peers",
        default="squid,tinyproxy,trafficserver,egressgate,egressgate-policy",
        help="peers besides the no-proxy baseline (always run); any egressgate one with -compiled appended "
        "runs the compiled build (.venv-compiled, make compiled)",
    )
    ap.add_argument(
        "--egressgate-workers", type=int, default=None, help="top-level `workers: N` in egressgate's config"
    )
    ap.add_argument("--repeat", type=int, default=1, help="run each figure N times and keep the median")
    ap.add_argument("--tunnel-procs", type=int, default=2, help="load-generator processes for tunnels/s")
    ap.add_argument("--max-tunnels", type=int, default=20000)
    ap.add_argument("--idle-tunnels", type=int, default=2000)
    ap.add_argument("--max-minutes", type=float, default=30.0, help="skip remaining figures after this")
    ap.add_argument("--out", default=str(RESULTS / "latest"), help="results path without extension")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    a = ap.parse_args(argv)
    a.only = [f.strip() for f in a.only.split(",") if f.strip()]
    for f in a.only:
        if f not in FIGURES:
            ap.error(f"unknown figure {f!r}; choose from {', '.join(FIGURES)}")
    a.peers = [p.strip() for p in a.peers.split(",") if p.strip() and p.strip() != "none"]
    a.rps_seconds = 4 if a.quick else 10
    a.tunnel_seconds = 4 if a.quick else 10
    a.bulk_bytes = (256 << 20) if a.quick else (2 << 30)
    a.latency_requests = 2000 if a.quick else 5000
    a.hold_open_seconds = 40 if a.quick else 60
    a.repeat = max(1, a.repeat)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every process started here
    bench = Bench(a)

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        results = bench.run()
    except KeyboardInterrupt:
        log("interrupted; stopping everything started here")
        return 130
    finally:
        bench.close()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = report.markdown(results)
    out.with_suffix(".md").write_text(md)
    print()
    print(report.console(results))
    log(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
