#!/usr/bin/env python3
"""How fast ``egressgate replay`` decides recorded traffic again, on one core.

Generates N synthetic JSON access-log records (default a million) shaped like a real log: 50
clients (password, token and anonymous), 400 destinations by name (each with its resolved
addresses) and IP, a mix of forwarded requests and tunnels, denials, a protect rule that a
tenth of the traffic falls under, records written in order of their end. Then replays them
against a candidate that tightens one rule and adds a protect limit, exactly as the command
does (``observe.logread`` reading the file, ``replay.Replayer`` deciding), pinned to one CPU.

    .venv/bin/python bench/replay_speed.py [--records N] [--gzip] [--keep FILE]

Prints the time to write the log, the time to replay it (records per second, seconds per
million) and the peak resident memory of the replay (constant in N: compare --records 100000).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from egressgate.commands.replay_core import Replayer, replay  # noqa: E402
from egressgate.model import iso8601  # noqa: E402
from egressgate.observe.logread import merged  # noqa: E402
from egressgate.proxy.build import load_candidate  # noqa: E402

LISTENER = "0.0.0.0:3128"
CANDIDATE = f"""
listen: [{{address: "{LISTENER}"}}]
log: {{access: /dev/null}}
egress:
  default: {{direct: {{}}}}
  vendor-x:
    bind: [10.0.1.5, 10.0.1.6]
    protect:
      - {{name: vx-api, destinations: ["api.vendor-x.com"], max_per_second: 50, max_concurrent: 20}}
clients:
""" + "".join(
    f"""  - name: job-{i}
    from: [10.8.0.0/16]
    username: job-{i}
    password_file: /nonexistent
    egress: [{'vendor-x, default' if i % 5 == 0 else 'default'}]
    allow: [{'"*.vendor-x.com", "api.vendor-x.com:8443"' if i % 5 == 0 else '"*"'}]
""" for i in range(40)) + """  - name: tokens
    from: [10.9.0.0/16]
    kubernetes: {issuer: "https://kubernetes.default.svc", jwks_file: /nonexistent, service_accounts: ["batch/*"]}
    egress: [default]
    deny: ["*.blocked.example"]
  - name: anon
    from: [10.10.0.0/16]
    egress: [default]
"""


def generate(path: Path, n: int, compress: bool, seed: int = 7) -> None:
    rnd = random.Random(seed)
    hosts = [f"h{i}.example.com" for i in range(380)] + [f"s{i}.vendor-x.com" for i in range(19)] + ["api.vendor-x.com"]
    addrs = {h: [f"93.184.{i // 250}.{i % 250 + 1}", f"2606:2800:220:1:248:1893:25c8:{i:x}"] for i, h in enumerate(hosts)}
    opener = gzip.open if compress else open
    t = 1_796_000_000.0
    pending: list[tuple[float, str]] = []  # (end, line): written in order of end, like the gateway
    with opener(path, "wt") as f:
        for k in range(n):
            t += rnd.expovariate(2000.0)
            kind = rnd.random()
            if kind < 0.8:
                i = rnd.randrange(40)
                client, addr, auth = f"job-{i}", f"10.8.{i}.{rnd.randrange(1, 250)}", "basic"
                profile = "vendor-x" if i % 5 == 0 else "default"
            elif kind < 0.95:
                client, addr, auth, profile = f"batch/sa-{rnd.randrange(8)}", f"10.9.0.{rnd.randrange(1, 250)}", "token", "default"
            else:
                client, addr, auth, profile = "anon", f"10.10.0.{rnd.randrange(1, 250)}", "none", "default"
            host = "api.vendor-x.com" if profile == "vendor-x" and rnd.random() < 0.5 else rnd.choice(hosts)
            tunnel = rnd.random() < 0.6
            duration = rnd.expovariate(1 / (2.0 if tunnel else 0.08))
            denied = rnd.random() < 0.03
            status, reason = (403, "destination_not_allowed") if denied else (200, "")
            member = rnd.choice(["10.0.1.5", "10.0.1.6"]) if profile == "vendor-x" else "10.0.0.9"
            doc = {"ts": iso8601(t), "ts_unix": round(t, 3), "end_ts": iso8601(t + duration),
                   "end_ts_unix": round(t + duration, 3), "client_addr": addr, "client": client, "listener": LISTENER,
                   "method": "CONNECT" if tunnel else "GET",
                   "target": f"{host}:443" if tunnel else f"http://{host}/item/{k % 1000}?page={k % 7}",
                   "status": status, "profile": profile, "egress_addr": "-" if denied else member, "egress_ip": None,
                   "upstream_addr": "-" if denied else addrs[host][0], "bytes_up": rnd.randrange(100, 5000),
                   "bytes_down": rnd.randrange(100, 500000), "duration_ms": round(duration * 1000, 3),
                   "reason": reason, "auth": auth, "addresses": addrs[host]}
            pending.append((t + duration, json.dumps(doc, separators=(",", ":")) + "\n"))
            if len(pending) >= 4096:  # (a bounded approximation of end order, as a real log's workers give)
                pending.sort()
                for _, line in pending[:2048]:
                    f.write(line)
                del pending[:2048]
        pending.sort()
        f.writelines(line for _, line in pending)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--gzip", action="store_true", help="write and read the log gzipped")
    p.add_argument("--keep", help="write the log here (and keep it) instead of a temporary file")
    args = p.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(args.keep) if args.keep else Path(tmp) / ("access.log.gz" if args.gzip else "access.log")
        config = Path(tmp) / "candidate.yaml"
        config.write_text(CANDIDATE)
        started = time.perf_counter()
        generate(log, args.records, args.gzip)
        wrote = time.perf_counter() - started
        rt = load_candidate(str(config))
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        cpu = time.process_time()
        rep = Replayer(rt)
        report = replay(rep, merged([str(log)], rep.malformed))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        size = log.stat().st_size
    print(f"log: {args.records:,} records, {size / 1e6:.0f} MB{' gzipped' if args.gzip else ''}, written in {wrote:.1f}s")
    print(f"replay on one core: {elapsed:.1f}s wall, {cpu:.1f}s CPU = {report.records / elapsed:,.0f} records/s "
          f"({elapsed / report.records * 1e6:.1f} us per record; {elapsed * 1e6 / report.records:.1f}s per million)")
    print("changes: " + ", ".join(f"{k} {v:,}" for k, v in report.counts.items()) + f"; protect late {report.late:,}; "
          f"malformed {report.malformed}")
    print(f"peak RSS: {rss / 1024:.0f} MiB (before the replay: {rss_before / 1024:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
