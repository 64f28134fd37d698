"""Admin HTTP endpoints (one small HTTP/1.1 server, llhttp-parsed, one request per connection):

- ``GET /healthz``: 200 while the process runs;
- ``GET /readyz``: 200 when listeners are up, a config is loaded, the gateway is not draining
  and no profile's observed egress IP contradicts its ``expect_ip`` (503 otherwise, JSON reasons);
- ``GET /metrics``: Prometheus exposition;
- ``GET /status``: JSON status (version, uptime, config, listeners, profiles, live connections);
- ``GET /``: a status page that refreshes itself;
- ``POST /-/reload``: validate and apply the config file again (bearer token if configured).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from importlib import resources

import httptools
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from ..errors import ConfigError
from ..http1.responses import simple_response
from ..observe.merge import merge
from ..proxy.server import Gateway

Reloader = Callable[[], Awaitable[None]]


def readiness(gw: Gateway) -> list[str]:
    problems = []
    rt = gw.runtime
    if gw.draining:
        problems.append("draining")
    if not gw.listening:
        problems.append("no listener is open")
    if rt.config.probe.required:
        for name, pool in rt.profiles.items():
            if pool.ip_matches is False:
                problems.append(f"profile {name}: egress IP {pool.observed_ip} is not one of {list(pool.expect_ip)}")
    return problems


def status(gw: Gateway) -> dict:
    rt = gw.runtime
    per_client: Counter[str] = Counter()
    per_profile: Counter[str] = Counter()
    tunnels = 0
    for conn in gw.connections:
        per_client[conn.client_name or "-"] += 1
        if conn.tunnel is not None:
            tunnels += 1
            per_profile[conn.tunnel.record.profile] += 1
        elif conn.queue:
            per_profile[conn.queue[0].record.profile] += 1
    traffic = gw.metrics.traffic_by_profile()
    profiles = {}
    for name, pool in rt.profiles.items():
        profiles[name] = {
            "kind": pool.kind,
            "members": [m.label for m in pool.members],
            "down": [m.label for m in pool.members if pool.is_down(m)],
            "traffic": traffic.get(name, {"requests": 0, "bytes_up": 0, "bytes_down": 0}),
            "expect_ip": list(pool.expect_ip),
            "observed_ip": pool.observed_ip,
            "observed_at": pool.observed_at,
            "ip_matches": pool.ip_matches,
            "probe_error": pool.probe_error,
        }
    problems = readiness(gw)
    return {
        "version": __version__,
        "uptime_seconds": round(time.time() - gw.started, 3),
        "ready": not problems,
        "not_ready_reasons": problems,
        "config": {"source": rt.source, "hash": rt.config_hash, "loaded_at": rt.loaded_at},
        "listeners": gw.listening,
        "profiles": profiles,
        "connections": {"total": len(gw.connections), "tunnels": tunnels, "by_client": dict(per_client),
                        "by_profile": dict(per_profile)},
        "recent_denials": list(gw.recent_denials)[::-1],
    }


async def worker_metrics(path: str, timeout: float = 2.0) -> str | None:
    """Another worker's exposition, from its private admin socket (None if it does not answer)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: worker\r\n\r\n")
            data = await reader.read()
            writer.close()
    except (OSError, TimeoutError):
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    return body.decode() if head.startswith(b"HTTP/1.1 200") else None


class AdminProtocol(asyncio.Protocol):
    """``workers``: the private sockets of the other worker processes, whose metrics are
    merged into this one's. ``metrics_only``: the private listener of a worker > 0."""

    def __init__(self, gw: Gateway, reload: Reloader | None, token: Callable[[], str | None],
                 workers: tuple[str, ...] = (), metrics_only: bool = False) -> None:
        self.gw = gw
        self.reload = reload
        self.token = token  # the bearer token in force (a reload may change it)
        self.workers = workers
        self.metrics_only = metrics_only
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > 65536:
            self._send(simple_response(413, b"request too large\n", "text/plain"))
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._send(simple_response(400, b"bad request\n", "text/plain"))

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        path = self.url.split(b"?", 1)[0].decode("latin-1")
        asyncio.get_running_loop().create_task(self._handle(method, path))

    async def _handle(self, method: str, path: str) -> None:
        gw = self.gw
        try:
            if self.metrics_only and path != "/metrics":
                self._send(simple_response(404, b"not found\n", "text/plain"))
            elif path == "/healthz":
                self._send(simple_response(200, b"ok\n", "text/plain"))
            elif path == "/readyz":
                problems = readiness(gw)
                body = json.dumps({"ready": not problems, "reasons": problems}).encode() + b"\n"
                self._send(simple_response(503 if problems else 200, body))
            elif path == "/metrics":
                own = generate_latest(gw.metrics.registry)
                if self.workers:
                    others = await asyncio.gather(*(worker_metrics(w) for w in self.workers))
                    own = merge([own.decode(), *(t for t in others if t is not None)]).encode()
                self._send(simple_response(200, own, CONTENT_TYPE_LATEST))
            elif path == "/status":
                self._send(simple_response(200, json.dumps(status(gw), indent=1).encode() + b"\n"))
            elif path in ("/", "/index.html"):
                page = resources.files("egressgate.admin").joinpath("status.html").read_bytes()
                self._send(simple_response(200, page, "text/html; charset=utf-8"))
            elif path == "/-/reload":
                await self._reload(method)
            else:
                self._send(simple_response(404, b"not found\n", "text/plain"))
        except Exception as exc:  # the admin listener must never take the gateway down
            gw.internal_error("admin", exc)
            self._send(simple_response(500, b"internal error\n", "text/plain"))

    async def _reload(self, method: str) -> None:
        if method != "POST":
            self._send(simple_response(405, b"use POST\n", "text/plain", extra=(("Allow", "POST"),)))
            return
        token = self.token()
        if token:
            given = self.headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + token.encode()):
                self._send(simple_response(401, b"bearer token required\n", "text/plain",
                                           extra=(("WWW-Authenticate", 'Bearer realm="egressgate"'),)))
                return
        try:
            await self.reload()
        except ConfigError as err:
            body = json.dumps({"reloaded": False, "errors": err.errors}, indent=1).encode() + b"\n"
            self._send(simple_response(400, body))
            return
        body = json.dumps({"reloaded": True, "hash": self.gw.runtime.config_hash}).encode() + b"\n"
        self._send(simple_response(200, body))

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            self.transport.close()
