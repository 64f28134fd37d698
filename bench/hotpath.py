"""The gateway's Python hot path alone, with no socket: CPU µs per forwarded request and per
tunnel set-up spent in egressgate's own code (parser callbacks, dispatch, routing, rewriting,
accounting), measured with ``time.process_time`` over many operations.

The socket benchmark (``run.py``) measures the whole process, kernel and event loop
included, and on a shared 2-core machine it moves ±20% from run to run; this one drives the
real ``Gateway`` and ``ClientConnection`` on the fake transports of the playbook tests
(``tests/unit/playbook.py``), so a change to the Python path shows as a stable figure
(a few per cent run to run). It is the lever's measure; ``run.py`` is the verdict.

    .venv/bin/python bench/hotpath.py [--requests N] [--tunnels N] [--policy] [--profile]

``--profile`` prints the top functions by own time (cProfile) for each loop.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "unit"))

import asyncio  # noqa: E402

import uvloop  # noqa: E402
from playbook import Play  # noqa: E402

asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # the loop the gateway runs on


class NoLog:
    """``log: {access: none}``, as the socket benchmark runs every peer."""

    def write(self, rec) -> None:
        pass


def gateway(cfg: str) -> Play:
    play = Play(cfg)
    play.gw.outcomes.access_log = NoLog()
    return play

ORIGIN = "203.0.113.9"
BODY = b"x" * 100
# what wrk sends through a proxy (the bench's req/s figure), plus a typical client's headers
REQUEST = (
    f"GET http://{ORIGIN}/ HTTP/1.1\r\nHost: {ORIGIN}\r\nUser-Agent: bench/1\r\nAccept: */*\r\n{{auth}}\r\n"
).encode()
# nginx's answer
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 02:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n" + BODY
)
PLAIN = """
listen: [{address: "127.0.0.1:3128"}]
log: {access: none}
clients: [{name: bench, from: [127.0.0.0/8]}]
security: {allow_private: [203.0.113.0/24], connect_ports: [443]}
"""
PASSWORD = "secret"


def policy_config() -> tuple[str, bytes]:
    """Auth + a 1,000-rule allowlist + a bound profile, as run.py's "+ policy" peer."""
    h = subprocess.run(
        [sys.executable, "-m", "egressgate", "hash-password", "--allow-short"],
        input=PASSWORD,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ},
    ).stdout.strip().splitlines()[-1]
    rules = "".join(f'      - "host-{i}.example.com"\n' for i in range(999))
    cfg = f"""
listen: [{{address: "127.0.0.1:3128"}}]
log: {{access: none}}
security: {{allow_private: [203.0.113.0/24], connect_ports: [443]}}
egress:
  bound: {{bind: [127.0.0.1]}}
clients:
  - name: bench
    from: [127.0.0.0/8]
    username: bench
    password_hash: "{h}"
    egress: [bound]
    allow:
{rules}      - "{ORIGIN}"
"""
    import base64

    auth = b"Proxy-Authorization: Basic " + base64.b64encode(f"bench:{PASSWORD}".encode()) + b"\r\n"
    return cfg, auth


def dialed(play: Play, n: int):
    """The n-th upstream connection, once the gateway has dialed it."""
    for _ in range(400):
        play.settle(3)
        if len(play.dialer.upstreams) >= n:
            return play.upstream(n - 1)
        time.sleep(0.005)
    raise RuntimeError(f"the gateway did not dial upstream #{n}: {play.bugs or play.outcomes()}")


def requests_loop(play: Play, auth: bytes, n: int) -> float:
    """µs of CPU per keep-alive request forwarded over a pooled upstream."""
    req = REQUEST.replace(b"{auth}", auth)
    conn, t = play.client()
    t.receive(req)
    up, ut = dialed(play, 1)  # (with a password: checked off the loop, the first time)
    up.data_received(RESPONSE)
    assert t.take().startswith(b"HTTP/1.1 200"), "the first request was not answered"
    gc.collect()
    t0 = time.process_time()
    for _ in range(n):
        t.receive(req)
        ut.chunks.clear()
        up.data_received(RESPONSE)
        t.chunks.clear()
    dt = time.process_time() - t0
    t.seen = ut.seen = 0
    assert len(play.dialer.upstreams) == 1, "requests did not reuse the pooled upstream"
    return 1e6 * dt / n


def tunnels_loop(play: Play, auth: bytes, n: int) -> float:
    """µs of CPU per tunnel: accept, CONNECT head, route, dial (the fake dialer), 200, close."""
    req = f"CONNECT {ORIGIN}:443 HTTP/1.1\r\nHost: {ORIGIN}:443\r\n".encode() + auth + b"\r\n"
    conn, t = play.client()  # the first: a password is checked off the loop, then known
    t.receive(req)
    up, ut = dialed(play, 1)
    t.peer_lost()
    ut.peer_lost()
    gc.collect()
    t0 = time.process_time()
    for i in range(n):
        conn, t = play.client()
        t.receive(req)
        up, ut = dialed(play, i + 2)
        t.peer_lost()
        ut.peer_lost()
    dt = time.process_time() - t0
    assert not play.gw.connections, "tunnels were left open"
    return 1e6 * dt / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--tunnels", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3, help="report the median of N runs")
    ap.add_argument("--policy", action="store_true", help="auth + 1,000-rule allowlist + bind")
    ap.add_argument("--profile", action="store_true", help="print the top functions by own time")
    a = ap.parse_args(argv)
    cfg, auth = policy_config() if a.policy else (PLAIN, b"")
    out = {}
    for name, loop, n in (("request", requests_loop, a.requests), ("tunnel", tunnels_loop, a.tunnels)):
        runs = []
        for _ in range(a.repeat):
            play = gateway(cfg)
            try:
                runs.append(loop(play, auth, n))
            finally:
                play.close()
        runs.sort()
        out[name] = runs
        print(
            f"{name:8} {runs[len(runs) // 2]:7.1f} µs CPU per {name} (Python hot path; runs: "
            + ", ".join(f"{x:.1f}" for x in runs)
            + ")"
        )
        if a.profile:
            play = gateway(cfg)
            prof = cProfile.Profile()
            try:
                prof.enable()
                loop(play, auth, n)
                prof.disable()
            finally:
                play.close()
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    if play.bugs:
        print("bugs caught while measuring:", play.bugs)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
