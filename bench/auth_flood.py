"""Password-check flood (issue 25 item 1): a bystander's first login and a reload's time, idle
and under N attacking connections sending distinct wrong passwords for a real user name.

    python bench/auth_flood.py [--attackers 1000] [--seconds 8]

Starts its own gateway (``python -m egressgate serve``) on loopback, prints figures; it asserts
nothing (tests never assert wall-clock times). Attackers come from 127.0.0.10-29, the bystander
from 127.0.0.200; every loop is bounded in time. Only the gateway it started is signalled.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
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


async def login(host: str, port: int, source: str, password: str, user: str = "job") -> tuple[float, bytes]:
    t = time.perf_counter()
    r, w = await asyncio.open_connection(host, port, local_addr=(source, 0))
    w.write(head(user, password))
    line = await r.readline()
    w.close()
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


async def measure(gw: Gateway, attackers: int, seconds: float) -> None:
    idle = [(await login(gw.host, gw.port, "127.0.0.200", f"right-{k}"))[0] for k in range(1)]
    print(f"bystander first login, idle:            {idle[0] * 1000:8.1f} ms")
    print(f"reload, idle:                           {gw.reload_time() * 1000:8.1f} ms")
    until = time.monotonic() + seconds
    tasks = [asyncio.create_task(attacker(gw.host, gw.port, i, until)) for i in range(attackers)]
    await asyncio.sleep(min(2.0, seconds / 3))  # the flood under way
    # a reload builds a new registry: the bystander's credentials are new to it (a first login)
    reload_s = await asyncio.get_running_loop().run_in_executor(None, gw.reload_time)
    took, line = await login(gw.host, gw.port, "127.0.0.201", "right-1", "job1")
    print(f"bystander first login, {attackers} attackers: {took * 1000:8.1f} ms  ({line.decode()[:40]})")
    print(f"reload, {attackers} attackers:               {reload_s * 1000:8.1f} ms")
    await asyncio.gather(*tasks, return_exceptions=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--attackers", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    cfg = {"listen": [{"address": "127.0.0.1:0"}], "admin": {"address": "127.0.0.1:0"},
           "reload": {"watch": False}, "security": {"allow_private": ["127.0.0.0/8"]},
           "clients": [{"name": "job1", "username": "job1", "from": ["127.0.0.201/32"],  # the bystander after the flood
                        "password_hash": hash_password("right-1")},
                       {"name": "job", "username": "job", "password_hash": hash_password("right-0")}]}
    with tempfile.TemporaryDirectory() as tmp:
        gw = Gateway(cfg, tmp)
        try:
            asyncio.run(measure(gw, args.attackers, args.seconds))
        finally:
            gw.stop()


if __name__ == "__main__":
    main()
