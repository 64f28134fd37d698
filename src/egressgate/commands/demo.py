"""``egressgate demo``: the product in one command, on loopback only.

Two jobs on two profiles bound to 127.0.0.2 and 127.0.0.3, an IP-echo origin, and an
origin that accepts only 127.0.0.2 (an "allowlisting provider"). It prints what each job
saw, then moves one profile to the allowlisted address with a reload and prints it again.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from ..app import App
from ..proxy.build import load_runtime

ALLOWED = "127.0.0.2"


class _Origin(asyncio.Protocol):
    """A one-request HTTP/1.1 origin: ``/ip`` echoes the peer address; ``/data`` answers 200
    only to ``ALLOWED`` (403 otherwise)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.peer = transport.get_extra_info("peername")[0]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" not in self.buf:
            return
        path = self.buf.split(b" ", 2)[1]
        if path.startswith(b"/ip"):
            status, body = "200 OK", self.peer
        elif self.peer == ALLOWED:
            status, body = "200 OK", "welcome, allowlisted client"
        else:
            status, body = "403 Forbidden", f"{self.peer} is not on the allowlist"
        self.transport.write(f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                             f"Connection: close\r\n\r\n{body}".encode())
        self.transport.close()


def _fetch(proxy: str, url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
    try:
        with opener.open(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _config(echo_port: int, ip_b: str) -> dict:
    return {
        "listen": [{"address": "127.0.0.1:0"}],
        "admin": {"address": None},
        "log": {"access": "none"},
        "egress": {
            "ip-a": {"bind": ["127.0.0.2"], "expect_ip": ["127.0.0.2"]},
            "ip-b": {"bind": [ip_b], "expect_ip": [ip_b]},
        },
        "clients": [
            {"name": "job-a", "from": ["127.0.0.0/8"], "username": "job-a", "password_env": "DEMO_SECRET",
             "egress": ["ip-a"]},
            {"name": "job-b", "from": ["127.0.0.0/8"], "username": "job-b", "password_env": "DEMO_SECRET",
             "egress": ["ip-b"]},
        ],
        "security": {"allow_private": ["127.0.0.0/8"]},
        "probe": {"echo_url": f"http://127.0.0.1:{echo_port}/ip"},
    }


async def _round(app: App, port: int, echo_port: int, data_port: int) -> list[tuple[str, ...]]:
    loop = asyncio.get_running_loop()
    rows = []
    for job, profile in (("job-a", "ip-a"), ("job-b", "ip-b")):
        proxy = f"http://{job}:demo-secret@127.0.0.1:{port}"
        _, seen = await loop.run_in_executor(None, _fetch, proxy, f"http://127.0.0.1:{echo_port}/ip")
        status, body = await loop.run_in_executor(None, _fetch, proxy, f"http://127.0.0.1:{data_port}/data")
        rows.append((job, profile, seen, f"{status} {body}"))
    return rows


def _table(rows: list[tuple[str, ...]]) -> str:
    rows = [("JOB", "PROFILE", "IP SEEN BY ORIGIN", "ALLOWLISTING PROVIDER (accepts 127.0.0.2)"), *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3] for r in rows)


async def _demo() -> int:
    loop = asyncio.get_running_loop()
    echo = await loop.create_server(_Origin, "127.0.0.1", 0)
    data = await loop.create_server(_Origin, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    data_port = data.sockets[0].getsockname()[1]
    os.environ["DEMO_SECRET"] = "demo-secret"
    with tempfile.TemporaryDirectory(prefix="egressgate-demo-") as tmp:
        path = Path(tmp) / "egressgate.yaml"
        path.write_text(yaml.safe_dump(_config(echo_port, "127.0.0.3"), sort_keys=False))
        app = App(str(path), load_runtime(str(path)))
        await app.start(admin=False, signals=False)
        port = int(app.gateway.listeners.bound_addresses()[0].rsplit(":", 1)[1])
        try:
            print("egressgate demo: two jobs, two egress profiles, one provider that allowlists 127.0.0.2\n")
            print("1) ip-a binds 127.0.0.2, ip-b binds 127.0.0.3")
            print(_table(await _round(app, port, echo_port, data_port)))
            print("\n2) the operator moves profile ip-b to 127.0.0.2 (one line of config) and reloads")
            path.write_text(yaml.safe_dump(_config(echo_port, ALLOWED), sort_keys=False))
            await app.reload()
            print(_table(await _round(app, port, echo_port, data_port)))
            await asyncio.sleep(0.3)  # the reload triggered an egress check; show it
            print("\n3) the gateway's own egress check (what /readyz and `egressgate probe` use)")
            for name, pool in app.gateway.runtime.profiles.items():
                if pool.expect_ip:
                    print(f"   {name}: expected {', '.join(pool.expect_ip)}, observed {pool.observed_ip}, "
                          f"{'OK' if pool.ip_matches else 'MISMATCH'}")
        finally:
            await app.close()
            echo.close()
            data.close()
    return 0


def main() -> int:
    try:
        import uvloop

        return uvloop.run(_demo())
    except ImportError:  # pragma: no cover
        return asyncio.run(_demo())
