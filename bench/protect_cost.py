#!/usr/bin/env python3
"""Micro-benchmark: what shared-IP protection (``egress.P.protect``, ``proxy/protect.py``) adds
to one request, in the three cases that matter, timing exactly the code the hooks run:

- off: no profile has ``protect`` rules (the route step tests ``rt.protect``, the response
  head tests its status, the finished record tests ``rec.protect``);
- unprotected: the runtime has rules, but not for this destination (one dict lookup, one
  rule-set match);
- protected: admitted (hold, concurrency and rate checks, a ticket) and released;
- protected, fleet store: the same with the budgets shared through Redis (``fleet.redis``:
  a real ``redis-server`` started here on loopback, killed by its pid; skipped without one).
  The guard admits from the slices it leased; when they run out it leases more (slots and
  tokens from Redis, in the background ahead of need), and that cost is in the figure.

    .venv/bin/python bench/protect_cost.py [--n N]

Prints nanoseconds per request for each case (best of 5 runs). Compare them with the
gateway's cost per request (``make bench``: ~8,000 req/s per core is ~125 us per request).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from egressgate.config import load_config_text  # noqa: E402
from egressgate.config.schema import RedisConfig  # noqa: E402
from egressgate.fleet.ledger import Ledger  # noqa: E402
from egressgate.fleet.owner import Owner  # noqa: E402
from egressgate.fleet.source import Fleet  # noqa: E402
from egressgate.model import AccessRecord, HostPort  # noqa: E402
from egressgate.observe.metrics import Metrics  # noqa: E402
from egressgate.proxy.build import build_runtime  # noqa: E402
from egressgate.proxy.protect import LeaseNeeded, SharedIpGuard, admit_route  # noqa: E402
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


async def per_request_fleet(rt, host: str, n: int, url: str) -> float:
    """The protected case with a fleet store: worker 0's guard, its owner and a ``Fleet``
    source over Redis at ``url``, exactly as ``app.py`` wires them."""
    from egressgate.fleet.redisstore import RedisStore

    loop = asyncio.get_running_loop()
    guard = SharedIpGuard(loop.time)

    def on_error(what: str, exc: BaseException) -> None:
        raise exc

    ledger = Ledger(loop.time)
    owner = Owner(None, ledger, guard.reclaim, guard.apply_hold, guard.stale_tokens, on_error)
    owner.source = Fleet(RedisStore(RedisConfig(url=url), "bench"), ledger, loop.time, "share", None, 3.0,
                         owner.fleet_hold, owner.give_back_idle, Metrics(), on_error)
    guard.budget = owner
    await owner.start()
    if not owner.source.up:
        raise RuntimeError("the fleet store did not answer")
    pool = rt.profiles["px"]
    r = Route(None, HostPort(host, 443), None, pool, pool.plans("job"), None)
    rec = AccessRecord("127.0.0.1", "l", 0.0)
    best = float("inf")
    try:
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(n):
                try:
                    admit_route(guard, rt.protect, r, rec)
                except LeaseNeeded as need:  # (dispatch: lease, then admit again)
                    await guard.acquire(need)
                    admit_route(guard, rt.protect, r, rec)
                rec.protect.release()
                rec.protect = None
            best = min(best, (time.perf_counter() - start) / n * 1e9)
    finally:
        await owner.close()
    return best


def fleet_figure(rt, host: str, n: int) -> float | None:
    """Start a redis-server on a free loopback port, time the fleet case, kill it (by pid)."""
    program = shutil.which("redis-server")
    if program is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="egressgate-bench-redis-")
    proc = subprocess.Popen([program, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp, "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        return asyncio.run(per_request_fleet(rt, host, n, f"redis://127.0.0.1:{port}/0"))
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


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
    fleet = fleet_figure(on, "api.vendor-x.com", args.n)
    if fleet is None:
        print(f"{'protected, fleet store':26}     (no redis-server: skipped)")
    else:
        print(f"{'protected, fleet store':26} {fleet:8.0f} ns per request (Redis on loopback)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
