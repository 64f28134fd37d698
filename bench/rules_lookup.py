#!/usr/bin/env python3
"""Micro-benchmark: destination rule lookups stay flat as the rule set grows (names are looked
up by label in dicts, not by scanning the rules). Moved out of tests/unit/test_rules.py, which
keeps the correctness cases: a wall-clock bound in the test suite fails on a loaded machine.

    .venv/bin/python bench/rules_lookup.py [--lookups N]

Prints lookups per second for 10, 1,000 and 10,000 rules and the ratio of the slowest to the
fastest; exit 1 when the ratio exceeds --max-ratio (default 5: a scan would be ~1000x).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from egressgate.policy.rules import RuleSet  # noqa: E402


def patterns(n: int) -> list[str]:
    out = [f"host{i}.example.com" for i in range(n * 4 // 10)]
    out += [f"*.zone{i}.example.net" for i in range(n * 3 // 10)]
    out += [f"svc{i}.example.org:{8000 + i}" for i in range(n * 2 // 10)]
    out += [f"10.{i // 256}.{i % 256}.0/24" for i in range(n - len(out))]
    return out


def rate(rs: RuleSet, lookups: int) -> float:
    start = time.perf_counter()
    for _ in range(lookups):
        rs.match("x.y.not-listed.example.com", 443, False)
    return lookups / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lookups", type=int, default=100_000)
    ap.add_argument("--max-ratio", type=float, default=5.0)
    args = ap.parse_args()
    rates = {}
    for n in (10, 1000, 10000):
        rates[n] = rate(RuleSet(patterns(n)), args.lookups)
        print(f"{n:6d} rules: {rates[n]:12,.0f} lookups/s")
    ratio = max(rates.values()) / min(rates.values())
    print(f"slowest/fastest: {ratio:.2f}")
    return 0 if ratio <= args.max_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
