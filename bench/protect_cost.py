#!/usr/bin/env python3
"""Micro-benchmark: what shared-IP protection (``egress.P.protect``, ``proxy/protect.py``) adds
to one request, in the three cases that matter, timing exactly the code the hooks run:

- off: no profile has ``protect`` rules (the route step tests ``rt.protect``, the response
  head tests its status, the finished record tests ``rec.protect``);
- unprotected: the runtime has rules, but not for this destination (one dict lookup, one
  rule-set match);
- protected: admitted (hold, concurrency and rate checks, a ticket) and released.

    .venv/bin/python bench/protect_cost.py [--n N]

Prints nanoseconds per request for each case (best of 5 runs). Compare them with the
gateway's cost per request (``make bench``: ~8,000 req/s per core is ~125 us per request).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from egressgate.build import build_runtime  # noqa: E402
from egressgate.config import load_config_text  # noqa: E402
from egressgate.model import AccessRecord, HostPort  # noqa: E402
from egressgate.proxy.protect import SharedIpGuard, admit_route  # noqa: E402
from egressgate.proxy.route import Route  # noqa: E402

CONFIG = """
egress:
  px:
    bind: [10.0.0.1]
    protect:
      - {name: vx, destinations: ["*.vendor-x.com"], max_concurrent: 1000000, max_per_second: 1000000000}
"""
BACKOFF = frozenset({429, 503})


def per_request(rt, host: str, n: int) -> float:
    guard = SharedIpGuard(time.monotonic)
    pool = rt.profiles["px"]
    r = Route(None, HostPort(host, 443), None, pool, pool.plans("job"), None)
    rec = AccessRecord("127.0.0.1", "l", 0.0)
    status = 200
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            if rt.protect:  # dispatch._judged
                admit_route(guard, rt.protect, r, rec)
            if status in BACKOFF and rec.protect is not None:  # forward.on_response_head
                rec.protect.answered(status, [])
            if rec.protect is not None:  # outcomes.finished
                rec.protect.release()
                rec.protect = None
        best = min(best, (time.perf_counter() - start) / n * 1e9)
    return best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    args = ap.parse_args()
    on = build_runtime(load_config_text(CONFIG), "", "bench")
    off = build_runtime(load_config_text(CONFIG.replace("    protect:\n", "    protect_off:\n").split(
        "    protect_off:")[0]), "", "bench")
    assert not off.protect and on.protect
    for what, rt, host in (("off (no protect rules)", off, "api.vendor-x.com"),
                           ("unprotected destination", on, "api.example.org"),
                           ("protected destination", on, "api.vendor-x.com")):
        print(f"{what:26} {per_request(rt, host, args.n):8.0f} ns per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
