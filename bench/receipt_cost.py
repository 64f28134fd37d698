#!/usr/bin/env python3
"""Micro-benchmark: what job receipts (``receipts.enabled``, ``observe/tally.py``) add to one
finished record, timing exactly the call ``Outcomes.finished`` makes (``Tallies.note``):

- off: ``receipts.enabled: false`` (one ``is not None`` test);
- request: a forwarded request of a known client to a known destination (the common case);
- tunnel: the same for a tunnel;
- refusal: a refused request (counted by reason);
- many: 5,000 clients x 20 destinations in turn (dicts larger than the caches).

    .venv/bin/python bench/receipt_cost.py [--n N]

Prints nanoseconds per record for each case (best of 5 runs). Compare them with the gateway's
cost per request (``make bench``: ~8,000 req/s per core is ~125 us per request).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from egressgate.model import AccessRecord  # noqa: E402
from egressgate.observe.tally import Tallies  # noqa: E402


def record(client: str, method: str, target: str, upstream: str = "93.184.216.34", reason: str = "") -> AccessRecord:
    rec = AccessRecord("10.8.0.7", "0.0.0.0:3128", time.time(), client=client, method=method, target=target,
                       status=200, profile="vendor-x", egress_addr="10.0.1.5", upstream_addr=upstream,
                       bytes_up=300, bytes_down=5000, reason=reason)
    rec.egress_ip = "203.0.113.10"
    return rec


def per_record(records: list[AccessRecord], n: int, enabled: bool = True) -> float:
    best = float("inf")
    for _ in range(5):
        tallies = Tallies() if enabled else None
        k = len(records)
        start = time.perf_counter()
        for i in range(n):
            if tallies is not None:  # observe.outcomes.Outcomes.finished
                tallies.note(records[i % k])
        best = min(best, (time.perf_counter() - start) / n * 1e9)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200_000)
    args = p.parse_args()
    req = [record("job-a", "GET", "http://api.vendor-x.com/v1/items?page=3")]
    tun = [record("job-a", "CONNECT", "api.vendor-x.com:443")]
    refused = [record("job-a", "CONNECT", "api.vendor-x.com:22", upstream="-", reason="connect_port_not_allowed")]
    many = [record(f"job-{c}", "CONNECT", f"h{d}.vendor-x.com:443") for d in range(20) for c in range(5000)]
    print(f"off:      {per_record(req, args.n, enabled=False):7.0f} ns per record")
    print(f"request:  {per_record(req, args.n):7.0f} ns per record")
    print(f"tunnel:   {per_record(tun, args.n):7.0f} ns per record")
    print(f"refusal:  {per_record(refused, args.n):7.0f} ns per record")
    print(f"many:     {per_record(many, args.n):7.0f} ns per record (5,000 clients x 20 destinations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
