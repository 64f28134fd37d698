"""Admin HTTP endpoints (one small HTTP/1.1 server, llhttp-parsed, one request per connection):

- ``GET /healthz``: 200 while the process runs;
- ``GET /readyz``: 200 when listeners are up, a config is loaded, the gateway is not draining
  and no profile's observed egress IP contradicts its ``expect_ip`` (503 otherwise, JSON reasons);
- ``GET /metrics``: Prometheus exposition;
- ``GET /status``: JSON status (version, uptime, config, listeners, profiles, live connections
  and what each is doing (``connections.open``: the ``OPEN_LIMIT`` oldest), sources refused at
  the gate (``refused_sources``: the ``REFUSED_LIMIT`` most recent)); with ``workers: N``,
  every worker's connections and shared-IP counts (``parts``: each worker's private socket
  answers ``GET /status-part``);
- ``GET /``: a status page that refreshes itself;
- ``POST /-/reload``: validate and apply the config file again (bearer token if configured);
- ``GET /receipt?client=NAME|pod=POD[&since=T]``: a job's signed receipt, every worker's traffic
  (bearer token if configured); on a worker's private socket, ``/-/tallies`` answers that
  worker's own tallies to the worker making a receipt.

Every request but those of the workers' private socket must come from a tool, not a web page
(``foreign_request``: Host an IP, localhost or ``admin.allowed_hosts``; no foreign Origin),
else 403; without ``admin.token``, ``POST /-/reload`` must not carry a form or text/plain
Content-Type (a request a page can send without a preflight). So a page in an operator's
browser can neither POST a reload nor read ``/status``
through a rebound name. Targets are shown without query strings or credentials
(``model.shown_target``).

Hostile or broken admin clients cost bounded resources: at most ``admin.max_connections``
connections are open, at most ``admin.max_connections_per_source`` from one address, each
must deliver its request within ``admin.idle_timeout`` and take its response within it again
(or it is closed), bytes after the one request of a connection are ignored, and a callback
never raises into the event loop (a bug is counted as ``internal_errors_total{where="admin"}``
and the connection closed).

Room for health checks: a new connection is not turned away while connections that have not
sent a whole request hold the places (``AdminConnections.admit``): the oldest of them is closed
instead (``reason="evicted"``), from the new connection's own source when that source is at
its share, else from the source holding the most. So idle connections, from one source or
from many, cannot make ``/healthz`` or ``/readyz`` fail: a probe sends its request at once and
is answered at once. Only connections whose requests are all being answered can fill the
listener (then a new one is closed: ``max_per_source`` or ``max_connections``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Protocol
from urllib.parse import parse_qs

import httptools
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__, build_kind
from ..egress.plan import refusing
from ..egress.providers import not_ready, profile_view
from ..errors import ConfigError
from ..http1.responses import simple_response
from ..model import ip_or_none, parse_moment, with_iso
from ..observe.merge import Merger
from ..proxy.whoami import ReceiptQuery
from . import parts

if TYPE_CHECKING:
    from ..observe.metrics import Metrics
    from ..observe.outcomes import Outcomes
    from ..proxy.blocks import BlockDesk
    from ..proxy.connector import Connector
    from ..proxy.gate import Gate
    from ..proxy.listeners import Listeners
    from ..proxy.protect import SharedIpGuard
    from ..proxy.runtime import Runtime

Reloader = Callable[[], Awaitable[None]]
OPEN_LIMIT = 200  # open connections listed in /status, oldest first
REFUSED_LIMIT = 100  # sources refused at the gate listed in /status, most recent first
PID_HEADER = "X-Egressgate-Pid"  # which process answered a worker's private /metrics
TALLIES_PATH = "/-/tallies"  # a worker's own receipt tallies, on its private socket


class GatewayView(Protocol):
    """What the admin endpoints read of the gateway (``proxy.server.Gateway`` is one): the
    status page shows much, but nothing here serves, dispatches or admits."""

    runtime: Runtime  # the configuration in force
    draining: bool
    started: float  # wall-clock start
    metrics: Metrics
    outcomes: Outcomes  # recent denials
    listeners: Listeners  # the addresses listened on
    gate: Gate  # sources refused at accept
    connector: Connector  # idle upstream connections (a count)
    protect: SharedIpGuard  # shared-IP limits and holds (a view)
    blocks: BlockDesk  # block states (a view)

    def open_connections(self) -> list[dict]: ...  # a snapshot of the open connections
    def internal_error(self, where: str, exc: BaseException) -> None: ...


class WorkerView(Protocol):
    """What the admin endpoints need to know about worker processes (``workers: N``)."""

    def sockets(self) -> list[tuple[int, str]]:
        """(index, private admin socket path) of each worker other than this one."""
        ...

    def snapshot(self) -> dict:
        """{"expected": N, "live": M, "workers": [{"index", "pid", "alive", "restarts", ...}]}."""
        ...


class ReceiptDeskView(Protocol):
    """What the admin endpoints need of job receipts (``receiptdesk.ReceiptDesk``)."""

    async def issue(self, query: ReceiptQuery) -> dict:
        """The signed receipt, every worker's tallies added up."""
        ...

    def local(self, query: ReceiptQuery) -> dict:
        """This worker's own tallies for the query (``observe.tally`` export)."""
        ...

    def describe(self) -> dict:
        """The public key and where it comes from (for /status)."""
        ...


class AdminConnections:
    """The admin listener's shared state: the connections open, in all and per source, and
    those still waiting for their request (oldest first), which may be closed to make room."""

    def __init__(self) -> None:
        self.open = 0
        self.per_source: Counter[str] = Counter()
        self.waiting: dict[str, dict[AdminProtocol, None]] = {}  # source -> connections, oldest first

    def admit(self, conn: AdminProtocol, source: str | None, max_total: int,
              max_per_source: int) -> tuple[AdminProtocol | None, str | None]:
        """Make room for ``conn`` (from ``source``; None: no per-source share, the private
        socket of workers). Returns (the connection to close to make room, or None; the reason
        ``conn`` itself is refused, or None). A refused connection is not counted."""
        victim = None
        if source is not None and self.per_source[source] >= max_per_source:
            victim = self._oldest_waiting(source)
            if victim is None:
                return None, "max_per_source"
        elif self.open >= max_total:
            busiest = max((s for s, conns in self.waiting.items() if conns), key=self.per_source.__getitem__,
                          default=None)
            victim = self._oldest_waiting(busiest) if busiest is not None else None
            if victim is None:
                return None, "max_connections"
        if victim is not None:
            self.release(victim)
        self.open += 1
        key = source if source is not None else ""
        self.per_source[key] += 1
        self.waiting.setdefault(key, {})[conn] = None
        conn.source_key = key
        conn.counted = True
        return victim, None

    def answered(self, conn: AdminProtocol) -> None:
        """``conn`` has sent its whole request: it is no longer closed to make room."""
        conns = self.waiting.get(conn.source_key)
        if conns is not None:
            conns.pop(conn, None)
            if not conns:
                del self.waiting[conn.source_key]

    def release(self, conn: AdminProtocol) -> None:
        """``conn`` is closed, or about to be: its place is free now."""
        if not conn.counted:
            return
        conn.counted = False
        self.answered(conn)
        self.open -= 1
        key = conn.source_key
        self.per_source[key] -= 1
        if self.per_source[key] <= 0:
            del self.per_source[key]

    def _oldest_waiting(self, source: str) -> AdminProtocol | None:
        conns = self.waiting.get(source)
        return next(iter(conns)) if conns else None


def foreign_request(headers: dict[bytes, bytes], allowed_hosts: tuple[str, ...]) -> str | None:
    """Why a request to the admin listener comes from a web page rather than an operator's
    tool, or None. A browser can be made to send requests here by any page it shows: a name
    rebound to this address (DNS rebinding) carries that name in ``Host``, a cross-site form or
    fetch carries the page's ``Origin`` (and ``Sec-Fetch-Site``). So ``Host`` must be an IP
    literal, ``localhost`` or one of ``admin.allowed_hosts`` (or absent), and ``Origin``, when
    given, must be this very host; ``Sec-Fetch-Site`` must not say ``cross-site``/``same-site``.
    Probes, scrapers and curl send an IP or a configured name and no ``Origin``."""
    host = headers.get(b"host")
    name = None
    if host is not None:
        name = _host_name(host.decode("latin-1"))
        if name is None or not (name == "localhost" or ip_or_none(name) is not None or name in {h.lower().rstrip(".") for h in allowed_hosts}):
            return "admin: Host not allowed (an IP address, localhost or admin.allowed_hosts)"
    origin = headers.get(b"origin")
    if origin is not None:
        text = origin.decode("latin-1").strip()
        scheme, sep, rest = text.partition("://")
        if not sep or scheme.lower() != "http" or host is None \
                or rest.rstrip("/").lower() != host.decode("latin-1").strip().lower():
            return "admin: cross-origin request refused"
    if headers.get(b"sec-fetch-site", b"").strip().lower() in (b"cross-site", b"same-site"):
        return "admin: cross-site request refused"
    return None


SIMPLE_CONTENT_TYPES = (b"application/x-www-form-urlencoded", b"multipart/form-data", b"text/plain")


def _simple_content_type(value: bytes | None) -> bool:
    """A Content-Type a browser sends cross-site without a preflight (the CORS-safelisted ones)."""
    return value is not None and value.split(b";", 1)[0].strip().lower() in SIMPLE_CONTENT_TYPES


def _host_name(host: str) -> str | None:
    """The name or address of a Host header value without its port; None if malformed."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else None
    name, _, port = host.rpartition(":") if ":" in host else (host, "", "")
    if port and not port.isdigit():
        return None
    return name.rstrip(".") or None


def readiness(gw: GatewayView) -> list[str]:
    """Why this instance should not get new connections (empty: ready).

    Profiles with ``expect_ip`` refuse their own traffic while their egress IP is wrong or
    unverified; that alone does not take the instance out of the load balancer while another
    such profile still serves (``probe.readiness: any``, the default). With ``all``, one
    refusing profile makes the instance unready; with ``probe.required: false``, none does.
    """
    problems = []
    rt = gw.runtime
    if gw.draining:
        problems.append("draining")
    if not gw.listeners.names:
        problems.append("no listener is open")
    probe = rt.config.probe
    if probe.required:
        attested = [pool for pool in rt.profiles.values() if pool.attest]
        refusing = [pool for pool in attested if not pool.healthy]
        if refusing and (probe.readiness == "all" or len(refusing) == len(attested)):
            problems += [pool.refusal()[1] for pool in refusing]
    # (providers marked required never count here: their refusal is shared by every replica;
    # the profile steers away from the refused member and /readyz shows it per profile)
    return problems


def profile_readiness(gw: GatewayView) -> dict[str, dict]:
    """Per profile: does it carry traffic, and what its egress IP check saw."""
    out = {}
    for name, pool in gw.runtime.profiles.items():
        refusal = pool.refusal()
        out[name] = {"ready": refusal is None, "attested": pool.attest, "expect_ip": list(pool.expect_ip),
                     "observed_ip": pool.observed_ip, "reason": refusal[1] if refusal else None,
                     "providers": not_ready(gw.runtime.providers, pool)}
    return out


def _attestation(pool, plan) -> dict:
    """One member's egress-IP check as ``/status`` shows it (active and standby alike)."""
    check = pool.checks.get(plan)
    return {"member": plan.label, "role": pool.role(plan), "attested": pool.verified(plan),
            "observed_ip": check.observed if check is not None else None,
            "error": check.error if check is not None else None, "at": check.at if check is not None else None,
            "failed_rounds": pool.fails.get(plan, 0)}


def status(gw: GatewayView, workers: WorkerView | None = None, receipts: ReceiptDeskView | None = None) -> dict:
    rt = gw.runtime
    per_client: Counter[str] = Counter()
    per_profile: Counter[str] = Counter()
    tunnels = 0
    views = gw.open_connections()  # oldest first
    for view in views:
        per_client[view["client"]] += 1
        tunnels += view["state"] == "tunnel"
        if view["state"] != "idle":
            per_profile[view["profile"]] += 1
    traffic = gw.metrics.traffic_by_profile()
    profiles = {}
    for name, pool in rt.profiles.items():
        profiles[name] = {
            "kind": pool.kind,
            "members": [m.label for m in pool.members],
            # standby members: attested and checked, carrying no traffic unless failed over to
            "standby": [m.label for m in pool.standby],
            "carrying": [m.label for m in pool.carrying()] if pool.kind != "direct" else [],
            "failover": pool.relief_view,
            "attestation": [_attestation(pool, m) for m in pool.everyone] if pool.attest else [],
            "down": [m.label for m in pool.everyone if pool.is_down(m)],
            "traffic": traffic.get(name, {"requests": 0, "bytes_up": 0, "bytes_down": 0}),
            "expect_ip": list(pool.expect_ip),
            "observed_ip": pool.observed_ip,
            "observed_at": pool.observed_at,
            "ip_matches": pool.ip_matches,
            "probe_error": pool.probe_error,
            "serving": pool.healthy,
            "refusal": (pool.refusal() or (None, None))[1],
            "protect": gw.protect.view(rt.protect.get(name), name, [m.label for m in pool.everyone]),
            "providers": profile_view(rt.providers, pool),
            # block-aware egress: each (member x provider with match) state, signals, evidence (this worker)
            "blocks": gw.blocks.view(name, [m.label for m in pool.members]),
        }
    problems = readiness(gw)
    return {
        "version": __version__,
        "build": build_kind(),  # pure or compiled (Cython), see setup.py
        "uptime_seconds": round(time.time() - gw.started, 3),
        "ready": not problems,
        "not_ready_reasons": problems,
        "config": {"source": rt.source, "hash": rt.config_hash, "loaded_at": rt.loaded_at},
        "listeners": gw.listeners.names,
        "profiles": profiles,
        "connections": {"total": sum(per_client.values()), "tunnels": tunnels, "by_client": dict(per_client),
                        "by_profile": dict(per_profile), "open": views[:OPEN_LIMIT],
                        "idle_upstream": len(gw.connector.pool)},
        "refused_sources": {"total": gw.gate.refused_source_count,
                            "recent": gw.gate.refused_sources(REFUSED_LIMIT)},
        "recent_denials": list(gw.outcomes.recent_denials)[::-1],
        **({"workers": workers.snapshot()} if workers is not None else {}),
        "receipts": receipts.describe() if receipts is not None else {"enabled": False},
    }


async def worker_get(index: int, path: str, target: str, timeout: float = 2.0) -> tuple[int, int | None, str | None]:
    """(index, pid, body) of ``GET target`` asked of another worker on its private admin socket
    (body None if it does not answer 200 within ``timeout``)."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(f"GET {target} HTTP/1.1\r\nHost: worker\r\n\r\n".encode())
            data = await reader.read()
    except (OSError, TimeoutError):
        return index, None, None
    finally:
        if writer is not None:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return index, None, None
    pid = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == PID_HEADER.lower().encode() and value.strip().isdigit():
            pid = int(value)
    try:
        return index, pid, body.decode()
    except UnicodeDecodeError:
        return index, None, None


async def worker_metrics(index: int, path: str, timeout: float = 2.0) -> tuple[int, int | None, str | None]:
    """(index, pid, exposition) of another worker, from its private admin socket (exposition
    None if it does not answer)."""
    return await worker_get(index, path, "/metrics", timeout)


class AdminProtocol(asyncio.Protocol):
    """One admin connection, one request. ``conns``: the listener's shared connection count.
    ``workers``: the other worker processes (their metrics are merged into this one's by
    ``merger``, their state shown by /readyz and /status). ``metrics_only``: the private
    listener of a worker > 0."""

    def __init__(self, gw: GatewayView, reload: Reloader | None, token: Callable[[], str | None],
                 conns: AdminConnections, workers: WorkerView | None = None, merger: Merger | None = None,
                 metrics_only: bool = False, receipts: ReceiptDeskView | None = None) -> None:
        self.gw = gw
        self.receipts = receipts  # job receipts (None when they are off)
        self.reload = reload
        self.token = token  # the bearer token in force (a reload may change it)
        self.conns = conns
        self.workers = workers
        self.merger = merger
        self.metrics_only = metrics_only
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.size = 0
        self.counted = False  # holds one of admin.max_connections (see AdminConnections)
        self.source_key = ""  # the source it counts against
        self.done = False  # the one request is complete: later bytes are ignored
        self.timer: asyncio.TimerHandle | None = None

    # --- transport callbacks: none of them may raise into the event loop ------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        try:
            limits = self.gw.runtime.config.admin
            source = None
            if not self.metrics_only:  # (the workers' private socket has one peer: worker 0)
                peer = transport.get_extra_info("peername")
                source = peer[0] if isinstance(peer, tuple) and peer else "?"
            victim, refused = self.conns.admit(self, source, limits.max_connections,
                                               limits.max_connections_per_source)
            if refused is not None:
                self.gw.metrics.admin_closed.labels(refused).inc()
                transport.abort()
                return
            if victim is not None:  # (already uncounted by admit: its connection_lost changes nothing)
                self.gw.metrics.admin_closed.labels("evicted").inc()
                self.gw.metrics.admin_connections.dec()
                victim._disarm()
                if victim.transport is not None:
                    victim.transport.abort()
            self.gw.metrics.admin_connections.inc()
            self._arm(limits.idle_timeout)
        except Exception as exc:
            self._crashed(exc)

    def data_received(self, data: bytes) -> None:
        if self.done or self.transport is None or self.transport.is_closing():
            return
        try:
            self.size += len(data)
            if self.size > 65536:
                self._send(simple_response(413, b"request too large\n", "text/plain"))
                return
            try:
                self.parser.feed_data(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade):
                # (an Upgrade or CONNECT request: answered as any other if it was complete)
                if not self.done:
                    self._send(simple_response(400, b"bad request\n", "text/plain"))
        except Exception as exc:
            self._crashed(exc)

    def eof_received(self) -> bool:
        return self.done  # a complete request may still be answered; otherwise close

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._disarm()
            if self.counted:
                self.conns.release(self)
                self.gw.metrics.admin_connections.dec()
        except Exception as err:
            self.gw.internal_error("admin", err)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self.timer = asyncio.get_running_loop().call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        """The client did not send its request, or take its response, within admin.idle_timeout."""
        self.timer = None  # (connection_lost cancels the timer: the connection is still here)
        try:
            self.gw.metrics.admin_closed.labels("idle_timeout").inc()
            if self.transport is not None:
                self.transport.abort()
        except Exception as exc:
            self._crashed(exc)

    def _crashed(self, exc: Exception) -> None:
        self.gw.internal_error("admin", exc)
        if self.transport is not None:
            self.transport.abort()

    # --- parser callbacks (inside feed_data) ----------------------------------------------
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_message_complete(self) -> None:
        if self.done:  # one request per connection: pipelined extras are parsed and ignored
            return
        self.done = True
        self.conns.answered(self)  # from now on it is never closed to make room
        self._disarm()  # the handler's own time (a reload, a merge) is not the client's
        method = self.parser.get_method().decode()
        path = self.url.split(b"?", 1)[0].decode("latin-1")
        asyncio.get_running_loop().create_task(self._handle(method, path))

    async def _handle(self, method: str, path: str) -> None:
        gw = self.gw
        try:
            refused = None if self.metrics_only else foreign_request(
                self.headers, gw.runtime.config.admin.allowed_hosts)
            if refused is not None:
                gw.metrics.admin_closed.labels("foreign").inc()
                self._send(simple_response(403, refused.encode() + b"\n", "text/plain"))
            elif self.metrics_only and path == "/status-part":  # (a worker's share of /status)
                body = json.dumps(parts.part(gw, OPEN_LIMIT)).encode()
                self._send(simple_response(200, body))
            elif self.metrics_only and path not in ("/metrics", TALLIES_PATH):
                self._send(simple_response(404, b"not found\n", "text/plain"))
            elif path == TALLIES_PATH and self.metrics_only:  # another worker gathering a receipt
                query = _receipt_query(self.url)
                body = json.dumps(self.receipts.local(query) if self.receipts is not None and query else None)
                self._send(simple_response(200, body.encode(), extra=((PID_HEADER, str(os.getpid())),)))
            elif path == "/healthz":
                self._send(simple_response(200, b"ok\n", "text/plain"))
            elif path == "/readyz":
                problems = readiness(gw)
                doc = {"ready": not problems, "reasons": problems, "profiles": profile_readiness(gw)}
                if self.workers is not None:
                    view = self.workers.snapshot()
                    doc["workers"] = {"expected": view["expected"], "live": view["live"]}
                self._send(simple_response(503 if problems else 200, json.dumps(doc).encode() + b"\n"))
            elif path == "/metrics":
                own = generate_latest(gw.metrics.registry)
                sockets = self.workers.sockets() if self.workers is not None else []
                if sockets and self.merger is not None:
                    others = await asyncio.gather(*(worker_metrics(i, w) for i, w in sockets))
                    own = self.merger.merge([(0, os.getpid(), own.decode()), *others]).encode()
                extra = ((PID_HEADER, str(os.getpid())),) if self.metrics_only else ()
                self._send(simple_response(200, own, CONTENT_TYPE_LATEST, extra=extra))
            elif path == "/status":
                doc = status(gw, self.workers, self.receipts)
                sockets = self.workers.sockets() if self.workers is not None else []
                if sockets:  # every worker's connections and counts (admin.parts)
                    others = await asyncio.gather(*(parts.fetch(i, w) for i, w in sockets))
                    doc = parts.merge(doc, 0, len(gw.protect.holds), others, OPEN_LIMIT)
                doc = with_iso(doc)  # (times both ways: model.TIME_FIELDS)
                self._send(simple_response(200, json.dumps(doc, indent=1).encode() + b"\n"))
            elif path in ("/", "/index.html"):
                page = resources.files("egressgate.admin").joinpath("status.html").read_bytes()
                self._send(simple_response(200, page, "text/html; charset=utf-8"))
            elif path == "/-/reload":
                await self._reload(method)
            elif path == "/receipt":
                await self._receipt(method)
            else:
                self._send(simple_response(404, b"not found\n", "text/plain"))
        except Exception as exc:  # the admin listener must never take the gateway down
            gw.internal_error("admin", exc)
            self._send(simple_response(500, b"internal error\n", "text/plain"))

    def _authorized(self) -> bool:
        """The bearer token, when one is configured (else True); a 401 has been sent when False."""
        token = self.token()
        if not token and _simple_content_type(self.headers.get(b"content-type")):
            # without a token, a state-changing call must be one a web page cannot send without a
            # CORS preflight (which this listener never answers): no form or text/plain body
            self.gw.metrics.admin_closed.labels("foreign").inc()
            self._send(simple_response(403, b"admin: a form or text/plain POST is refused (send no "
                                       b"Content-Type, e.g. curl -X POST, or set admin.token)\n", "text/plain"))
            return False
        if token:
            given = self.headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + token.encode()):
                self._send(simple_response(401, b"bearer token required\n", "text/plain",
                                           extra=(("WWW-Authenticate", 'Bearer realm="egressgate"'),)))
                return False
        return True

    async def _receipt(self, method: str) -> None:
        """``GET /receipt?client=NAME[&pod=POD][&since=T]`` (or ``?pod=POD``): the signed receipt
        of that client (every pod of it, unless one is named), every worker's traffic."""
        if method != "GET":
            self._send(simple_response(405, b"use GET\n", "text/plain", extra=(("Allow", "GET"),)))
            return
        if not self._authorized():
            return
        if self.receipts is None:
            self._send(simple_response(404, b"receipts are off (receipts.enabled: false)\n", "text/plain"))
            return
        try:
            query = _receipt_query(self.url, "admin")
        except ValueError:
            self._send(simple_response(400, b"since: expected Unix seconds or ISO 8601 UTC (2026-12-01T09:00:00Z)\n",
                                       "text/plain"))
            return
        if query is None:
            self._send(simple_response(400, b"name the job: /receipt?client=NAME or /receipt?pod=POD "
                                            b"(and &since=T)\n", "text/plain"))
            return
        doc = await self.receipts.issue(query)
        if not doc["receipt"]["identities"]:
            body = {"error": "no traffic recorded for this client/pod on this instance (or it expired)",
                    "client": query.client, "pod": query.pod}
            self._send(simple_response(404, json.dumps(body).encode() + b"\n"))
            return
        self._send(simple_response(200, json.dumps(doc, indent=1, ensure_ascii=False).encode() + b"\n"))

    async def _reload(self, method: str) -> None:
        if method != "POST":
            self._send(simple_response(405, b"use POST\n", "text/plain", extra=(("Allow", "POST"),)))
            return
        if not self._authorized():
            return
        try:
            await self.reload()
        except ConfigError as err:
            body = json.dumps({"reloaded": False, "errors": err.errors}, indent=1).encode() + b"\n"
            self._send(simple_response(400, body))
            return
        pending = {name: p.describe() for name, p in self.gw.runtime.providers.pending.items()}
        dark = refusing(self.gw.runtime.profiles)  # profiles the reloaded config leaves refusing all traffic
        body = json.dumps({"reloaded": True, "hash": self.gw.runtime.config_hash,
                           **({"pending_switches": pending} if pending else {}),
                           **({"refusing": dark} if dark else {})}).encode() + b"\n"
        self._send(simple_response(200, body))

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.done = True
            self.transport.write(data)
            self.transport.close()
            # the client has admin.idle_timeout to take the response, then it is cut off
            self._arm(self.gw.runtime.config.admin.idle_timeout)


def _receipt_query(url: bytes, asked_by: str = "job") -> ReceiptQuery | None:
    """``client``, ``pod``, ``since`` from a /receipt (or /-/tallies) URL; None when it names
    neither a client nor a pod; ValueError for a bad ``since``."""
    q = parse_qs(url.partition(b"?")[2].decode("latin-1"), keep_blank_values=True)
    client, pod, since = (q.get(k, [None])[0] for k in ("client", "pod", "since"))
    if client is None and pod is None:
        return None
    return ReceiptQuery(client, pod, parse_moment(since) if since else None, asked_by)
