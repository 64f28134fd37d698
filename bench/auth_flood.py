"""Password-check flood (issue 25 item 1): a bystander's first login and a reload's time, idle
and under N attacking connections sending distinct wrong passwords for a real user name.

    python bench/auth_flood.py [--attackers 1000] [--seconds 8] [--samples 5]

Starts its own gateway (``python -m egressgate serve``) on loopback, prints figures; it asserts
nothing (tests never assert wall-clock times). Attackers come from 127.0.0.10-29 and run in a
process of their own (this script again, ``--attack``); the bystanders log in from this process
with blocking sockets, one distinct first login each (job1.. from 127.0.0.201.., job11.. idle
from 127.0.0.211..), so a bystander's figure is the gateway's time and not the attackers' event
loop (measured on the attackers' loop, a bystander's login read 450-580 ms on a gateway that
answered it in 60-140 ms). Every loop is bounded in time. Only the processes it started are
signalled.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import yaml

from egressgate.policy.passwords import hash_password


def head(user: str, password: str) -> bytes:
    creds = base64.b64encode(f"{user}:{password}".encode()).decode()
    return (f"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\nProxy-Authorization: Basic {creds}\r\n\r\n").encode()


def login(host: str, port: int, source: str, password: str, user: str = "job") -> tuple[float, bytes]:
    """A bystander's login from its own blocking socket: (seconds, status line)."""
    t = time.perf_counter()
    with socket.create_connection((host, port), timeout=60, source_address=(source, 0)) as s:
        s.sendall(head(user, password))
        line = s.recv(200).split(b"\r\n", 1)[0]
    return time.perf_counter() - t, line.strip()


async def attacker(host: str, port: int, i: int, until: float) -> None:
    n = 0
    while time.monotonic() < until:
        try:
            r, w = await asyncio.open_connection(host, port, local_addr=(f"127.0.0.{10 + i % 20}", 0))
            w.write(head("job", f"wrong-{i}-{n}"))
            await asyncio.wait_for(r.readline(), max(0.01, until - time.monotonic()))
            w.close()
        except (TimeoutError, OSError):
            await asyncio.sleep(0.05)
        n += 1


class Gateway:
    def __init__(self, cfg: dict, tmp: str) -> None:
        self.path = os.path.join(tmp, "gw.yaml")
        with open(self.path, "w") as f:
            yaml.safe_dump(cfg, f)
        self.events: list[dict] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "egressgate", "serve", "--config", self.path],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        threading.Thread(target=self._read, daemon=True).start()
        started = self.wait("started", 0, 30)
        self.host, port = started["listen"][0].rsplit(":", 1)
        self.port = int(port)

    def _read(self) -> None:
        for line in self.proc.stderr:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                print(line.decode(errors="replace").rstrip(), file=sys.stderr)

    def wait(self, name: str, after: int, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events[after:]:
                if e.get("event") == name:
                    return e
            time.sleep(0.005)
        raise RuntimeError(f"no {name} event within {timeout}s")

    def reload_time(self) -> float:
        n = len(self.events)
        t = time.perf_counter()
        self.proc.send_signal(signal.SIGHUP)
        self.wait("reloaded", n, 120)
        return time.perf_counter() - t

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def flood(host: str, port: int, attackers: int, seconds: float) -> None:
    until = time.monotonic() + seconds
    await asyncio.gather(*(attacker(host, port, i, until) for i in range(attackers)), return_exceptions=True)


def logins(gw: Gateway, first: int, n: int, pause: float = 0.0) -> list[float]:
    out = []
    for k in range(first, first + n):
        took, line = login(gw.host, gw.port, f"127.0.0.{200 + k}", f"right-{k}", f"job{k}")
        if not line.startswith(b"HTTP/1.1 403"):  # (CONNECT to port 9: identified, then refused by port)
            print(f"  job{k}: unexpected answer {line.decode()[:60]}")
        out.append(took * 1000)
        time.sleep(pause)
    return out


def figures(ms: list[float]) -> str:
    return f"median {statistics.median(ms):7.1f} ms, max {max(ms):7.1f} ms  ({len(ms)} logins)"


def measure(gw: Gateway, attackers: int, seconds: float, samples: int, nice: int) -> None:
    print(f"bystander first login, idle:             {figures(logins(gw, 11, samples))}")
    print(f"reload, idle:                            {gw.reload_time() * 1000:7.1f} ms")
    att = subprocess.Popen([sys.executable, __file__, "--attack", f"{gw.host}:{gw.port}",
                            "--attackers", str(attackers), "--seconds", str(seconds), "--attack-nice", str(nice)], stdout=subprocess.DEVNULL)
    try:
        time.sleep(min(2.5, seconds / 3))  # the flood under way
        reload_s = gw.reload_time()  # (and a new registry: the bystanders' logins are first logins)
        under = logins(gw, 1, samples, pause=min(0.3, seconds / 30))
        print(f"bystander first login, {attackers} attackers: {figures(under)}")
        print(f"reload, {attackers} attackers:                {reload_s * 1000:7.1f} ms")
    finally:
        att.wait(seconds + 30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--attackers", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--samples", type=int, default=5, help="bystander logins idle, and under the flood")
    ap.add_argument("--attack-nice", type=int, default=0,
                    help="niceness of the attackers' process (19: it takes only CPU the gateway leaves, "
                         "as an attacker on another machine would)")
    ap.add_argument("--attack", metavar="HOST:PORT", help=argparse.SUPPRESS)  # (the attackers' process)
    args = ap.parse_args()
    if args.attack:
        os.nice(args.attack_nice)
        host, port = args.attack.rsplit(":", 1)
        asyncio.run(flood(host, int(port), args.attackers, args.seconds))
        return
    samples = max(1, min(args.samples, 9))
    bystanders = [{"name": f"job{k}", "username": f"job{k}", "from": [f"127.0.0.{200 + k}/32"],
                   "password_hash": hash_password(f"right-{k}")} for k in [*range(1, 1 + samples), *range(11, 11 + samples)]]
    cfg = {"listen": [{"address": "127.0.0.1:0"}], "admin": {"address": "127.0.0.1:0"},
           "reload": {"watch": False}, "security": {"allow_private": ["127.0.0.0/8"]},
           "clients": [*bystanders, {"name": "job", "username": "job", "password_hash": hash_password("right-0")}]}
    with tempfile.TemporaryDirectory() as tmp:
        gw = Gateway(cfg, tmp)
        try:
            measure(gw, args.attackers, args.seconds, samples, args.attack_nice)
        finally:
            gw.stop()


if __name__ == "__main__":
    main()
