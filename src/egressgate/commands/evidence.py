"""``egressgate evidence --profile P --provider V [--since T] [--json]``: what a provider's
support desk needs to look into a block of our egress IP, from the gateway's own records.

Read from the JSON access log(s) (``--log``, plain or gzipped, rotated files and several
instances together: ``observe.logread``; default: ``log.access`` of ``--config`` and its rotated
files) and the gateway's events (``--events``: its stderr, JSON lines; other lines skipped):

- per member of the profile seen carrying the provider's traffic: our egress IP (the attested
  ``egress_ip`` when the profile checks it, else the member's source address), the time window,
  counts by signal (``ok``, ``block_status``, ``marker``, ``throttle``, ``early_close``,
  ``tls_alert``, ``tiny_tunnel``, ``connect_fail``), sample answers (time, status, method,
  target without its query string, the evidence line: status line, marker, TLS alert), the
  state changes (``egress_block_state`` events) and the active checks' results
  (``provider_check`` events).

Never a request body, a query string or a credential: the records hold none of them (targets
are shown as ``model.shown_target`` shows them), and nothing else is read.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from ..model import iso8601, parse_iso8601, shown_target
from ..observe.logread import Malformed, merged
from .replay import UsageError, log_paths, parse_since

SAMPLES = 20  # sample answers per member
CHECKS = 20  # active checks per member (the latest)


def main(profile: str, provider: str, logs: list[str] | None, events: list[str] | None, config: str | None,
         since: str | None, as_json: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        access = _access_path(config) if not logs else "stdout"
        paths = log_paths(logs, access)
        since_t = parse_since(since, time.time()) if since else None
    except UsageError as exc:
        print(f"egressgate evidence: {exc}", file=err)
        return 2
    malformed: list[Malformed] = []
    doc = gather(profile, provider, paths, events or [], since_t, malformed.append)
    if malformed:
        print(f"egressgate evidence: {len(malformed)} unreadable log line(s), first: {malformed[0]}", file=err)
    print(json.dumps(doc, indent=1) if as_json else text(doc), file=out)
    return 0


def _access_path(config: str | None) -> str:
    if config is None:
        raise UsageError("name the access log files with --log FILE ... (or --config: its log.access)")
    from ..errors import ConfigError
    from ..proxy.build import load_candidate

    try:
        return load_candidate(config).config.log.access
    except ConfigError as exc:
        raise UsageError("; ".join(exc.errors)) from None


def _member(doc: dict, name: str) -> dict:
    return doc.setdefault(name, {"egress_ip": None, "first": None, "last": None, "signals": {}, "samples": [],
                                 "tls_alerts": [], "state_changes": [], "checks": []})


def gather(profile: str, provider: str, paths: list[str], events: list[str], since: float | None,
           on_malformed) -> dict:
    members: dict[str, dict] = {}
    first = last = None
    for line in merged(paths, on_malformed):
        rec = line.doc
        if rec.get("profile") != profile or rec.get("provider") != provider:
            continue
        if since is not None and line.start < since:
            continue
        m = _member(members, str(rec.get("member", "-")))
        m["egress_ip"] = rec.get("egress_ip") or m["egress_ip"]
        first = line.start if first is None else min(first, line.start)
        last = line.end if last is None else max(last, line.end)
        m["first"] = line.start if m["first"] is None else min(m["first"], line.start)
        m["last"] = line.end if m["last"] is None else max(m["last"], line.end)
        signal = str(rec.get("signal", "ok"))
        m["signals"][signal] = m["signals"].get(signal, 0) + 1
        if signal == "ok":
            continue
        sample = {"ts": iso8601(line.start), "status": rec.get("status"), "method": rec.get("method"),
                  "target": shown_target(str(rec.get("target", ""))), "signal": signal,
                  "evidence": rec.get("evidence", ""), "upstream_addr": rec.get("upstream_addr"),
                  "egress_addr": rec.get("egress_addr"), "bytes_up": rec.get("bytes_up"),
                  "bytes_down": rec.get("bytes_down"),
                  **({"first_bytes": rec["first_bytes"]} if "first_bytes" in rec else {})}
        if len(m["samples"]) < SAMPLES:
            m["samples"].append(sample)
        if signal == "tls_alert" and len(m["tls_alerts"]) < SAMPLES:
            m["tls_alerts"].append(sample)
    for path in events:
        for ev in _events(path):
            if ev.get("profile") != profile or ev.get("provider") != provider:
                continue
            try:
                at = parse_iso8601(str(ev.get("ts")))
            except ValueError:
                continue
            if since is not None and at < since:
                continue
            member = str(ev.get("member", "-"))
            if ev.get("event") == "egress_block_state":
                _member(members, member)["state_changes"].append(
                    {"ts": ev.get("ts"), "before": ev.get("before"), "after": ev.get("after"),
                     "signal": ev.get("signal"), "evidence": ev.get("evidence"), "counts": ev.get("counts")})
            elif ev.get("event") == "provider_check":
                checks = _member(members, member)["checks"]
                checks.append({"ts": ev.get("ts"), "ok": ev.get("ok"), "outcome": ev.get("outcome"),
                               "detail": ev.get("detail"), "status": ev.get("status"),
                               "egress_addr": ev.get("egress_addr"), "remote_addr": ev.get("remote_addr")})
                del checks[:-CHECKS]
    for name, m in members.items():
        m["egress_ip"] = m["egress_ip"] or name
        for key in ("first", "last"):
            m[key] = iso8601(m[key]) if m[key] is not None else None
    return {"profile": profile, "provider": provider,
            "window": {"from": iso8601(since if since is not None else first) if (since or first) else None,
                       "to": iso8601(last) if last is not None else None},
            "sources": {"logs": paths, "events": events}, "members": members}


def _events(path: str):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for raw in f:
                if not raw.startswith("{"):
                    continue
                try:
                    doc = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(doc, dict):
                    yield doc
    except OSError as exc:
        raise UsageError(f"cannot read events file {path}: {exc.strerror}") from None



# a member's evidence, section by section: (key in the document, title, one line per entry)
_SECTIONS = (
    ("samples", "sample answers",
     lambda s: f"{s['ts']}  {s['status']}  {s['method']} {s['target']}  [{s['signal']}] {s['evidence']}"),
    ("tls_alerts", "TLS alerts", lambda s: f"{s['ts']}  {s['evidence']}"),
    ("state_changes", "state changes",
     lambda c: f"{c['ts']}  {c['before']} -> {c['after']}  ({c['signal']}: {c['evidence']})"),
    ("checks", "active checks", lambda c: f"{c['ts']}  {'OK' if c['ok'] else 'FAIL'} {c['outcome']}: {c['detail']}"),
)

def text(doc: dict) -> str:
    w = doc["window"]
    out = [f"Egress evidence: provider {doc['provider']}, profile {doc['profile']}",
           f"Time window (UTC): {w['from'] or '-'} .. {w['to'] or '-'}"]
    if not doc["members"]:
        out.append("No traffic to this provider's destinations in the window.")
    for name, m in doc["members"].items():
        out += ["", f"Our egress IP {m['egress_ip']} (member {name}): {m['first'] or '-'} .. {m['last'] or '-'}",
                "  signals: " + (", ".join(f"{k} {v}" for k, v in sorted(m["signals"].items())) or "none")]
        for key, title, line in _SECTIONS:
            if m[key]:
                out.append(f"  {title}:")
                out += ["    " + line(e) for e in m[key]]
    return "\n".join(out)
