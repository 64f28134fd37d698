"""``Gateway``: the state shared by every connection (passed in explicitly, never global),
the listeners, the sweeper that enforces timeouts, reload and drain.

Reload swaps the whole ``Runtime`` at once: new requests see the new one, requests and
tunnels under way keep the one they started with. A reload is all or nothing: new listeners
are bound and every TLS context is built fresh first (``prepare_listeners``); only when all of
that worked is the runtime swapped, old listeners closed and the new contexts handed to new
handshakes (``commit_listeners``).

Drain (SIGTERM): not ready at once; keep accepting for ``drain.grace`` so the load balancer
notices; close the listeners; let requests and tunnels finish up to ``drain.timeout``;
then close what is left.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import ssl
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..egress.dialer import Dialer, SourceUnavailable
from ..egress.localaddr import local_addresses
from ..egress.plan import EgressPlan, ProfilePool
from ..egress.resolver import Resolver
from ..errors import ConfigError, LimitReached
from ..model import parse_socket_address
from ..observe.accesslog import AccessLog, log_event
from ..observe.metrics import INTERNAL_ERROR_SITES, Metrics
from ..policy.clients import PendingCheck
from ..policy.guard import OwnListeners
from .runtime import Runtime
from .session import ClientConnection
from .upstream import Upstream, UpstreamPool


@dataclass(slots=True)
class ListenerInfo:
    name: str  # the configured address, e.g. "127.0.0.1:3128"
    tls: bool
    connections: object = None  # this listener's gauge children, looked up once
    tunnels: object = None

    def default_profile(self, rt: Runtime) -> str:
        listener = rt.listeners.get(self.name)
        return listener.egress if listener is not None else "default"


class Gateway:
    def __init__(self, runtime: Runtime, metrics: Metrics, access_log: AccessLog, resolver: Resolver,
                 loop: asyncio.AbstractEventLoop, reuse_port: bool = False) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.access_log = access_log
        self.resolver = resolver
        self.loop = loop
        self.dialer = Dialer(loop)
        self.pool = UpstreamPool()
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self.started = time.time()
        self.reuse_port = reuse_port
        self._servers: dict[str, asyncio.base_events.Server] = {}
        self._tls: dict[str, ssl.SSLContext] = {}  # the context in force per TLS listener
        self._tls_mode: dict[str, str] = {}
        self._infos: dict[str, ListenerInfo] = {}
        self.own = OwnListeners()  # our own listening sockets: never a destination
        self.admin_sockets: list[tuple[str, int]] = []  # set by the app (the admin listener)
        self._sweeper: asyncio.Task | None = None
        self._failures: dict[str, tuple[int, float]] = {}
        self._checks: dict[bytes, asyncio.Future[bool]] = {}
        self._rejected_logged = 0.0
        self.on_reload: list[Callable[[Runtime, Runtime], None]] = []
        self.recent_denials: deque[dict] = deque(maxlen=50)
        self.per_client: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}

    # --- listeners ------------------------------------------------------------------------
    async def start(self) -> None:
        await self.commit_listeners(await self.prepare_listeners(self.runtime))
        self._publish(self.runtime)
        self._sweeper = self.loop.create_task(self._sweep())

    @property
    def listening(self) -> list[str]:
        return list(self._servers)

    def bound_addresses(self) -> list[str]:
        """The addresses actually bound (a configured port 0 becomes the kernel's choice)."""
        out = []
        for server in self._servers.values():
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return out

    async def prepare_listeners(self, rt: Runtime) -> ListenerChange:
        """Everything about ``rt``'s listeners that can fail, done before anything changes: a
        fresh TLS context per TLS listener (certificate, key and CA loaded and matched), and
        new listeners bound (not yet serving). Raises ``ConfigError`` and leaves the gateway as
        it was; ``commit_listeners`` then applies the change and cannot fail."""
        errors = []
        contexts: dict[str, ssl.SSLContext] = {}
        for i, spec in enumerate(rt.config.listen):
            mode = _tls_mode(spec)
            if spec.address in self._servers and self._tls_mode.get(spec.address) != mode:
                errors.append(f"{rt.source}:0: listen[{i}].tls: changing a listener between plain, TLS and "
                              f"mutual TLS ({self._tls_mode.get(spec.address)} -> {mode}) needs a restart")
            if spec.tls is not None:
                try:
                    contexts[spec.address] = server_tls_context(spec.tls)
                except (OSError, ssl.SSLError, ValueError) as exc:
                    errors.append(f"{rt.source}:0: listen[{i}].tls: {exc}")
        if errors:
            raise ConfigError(errors)
        bound: dict[str, tuple[asyncio.base_events.Server, ListenerInfo]] = {}
        wanted = {spec.address for spec in rt.config.listen}
        renamed: dict[str, str] = {}  # a listener configured with port 0, now named by its real port
        for name, server in self._servers.items():
            if name not in wanted:
                real = _bound_name(server)
                if real in wanted and real not in self._servers and self._tls_mode.get(name) == \
                        next(_tls_mode(sp) for sp in rt.config.listen if sp.address == real):
                    renamed[name] = real
        for i, spec in enumerate(rt.config.listen):
            name = spec.address
            if name in self._servers or name in renamed.values():
                continue
            host, port = parse_socket_address(name)
            info = ListenerInfo(name, spec.tls is not None, self.metrics.active_connections.labels(name),
                                self.metrics.active_tunnels.labels(name))
            ctx = contexts.get(name)
            if ctx is not None:
                ctx.sni_callback = functools.partial(self._pick_tls, info)
            try:
                bound[name] = (await self.loop.create_server(
                    lambda info=info: ClientConnection(self, info), host, port, ssl=ctx, backlog=4096,
                    reuse_port=self.reuse_port or None, start_serving=False), info)
            except OSError as exc:
                for server, _ in bound.values():
                    server.close()
                raise ConfigError([f"{rt.source}:0: listen[{i}].address: cannot listen on {name}: "
                                   f"{exc.strerror or exc}"]) from None
        modes = {spec.address: _tls_mode(spec) for spec in rt.config.listen}
        removed = [n for n in self._servers if n not in wanted and n not in renamed]
        return ListenerChange(contexts, bound, removed, modes, renamed)

    async def commit_listeners(self, change: ListenerChange) -> None:
        for name in change.removed:
            self._servers.pop(name).close()
            self._infos.pop(name, None)
            self._tls.pop(name, None)
        for old, new in change.renamed.items():
            self._servers[new] = self._servers.pop(old)
            info = self._infos[new] = self._infos.pop(old)
            info.name = new
            if old in self._tls:
                self._tls[new] = self._tls.pop(old)
        self._tls.update(change.contexts)  # live listeners hand new handshakes the new context
        self._tls_mode = change.modes
        for name, (server, info) in change.bound.items():
            self._servers[name] = server
            self._infos[name] = info
            await server.start_serving()
        self.refresh_own()

    def refresh_own(self) -> None:
        """Recompute the addresses no request may be sent to (our proxy and admin listeners)."""
        bound = list(self.admin_sockets)
        for server in self._servers.values():
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                bound.append((host.split("%", 1)[0], port))
        self.own = OwnListeners.of(bound, local_addresses() if any(
            ipaddress.ip_address(h).is_unspecified for h, _ in bound) else [])

    def _pick_tls(self, info: ListenerInfo, sslobj, server_name, ctx) -> None:  # noqa: ARG002
        """SNI callback (OpenSSL calls it for every ClientHello, SNI or not): a listener's
        server context is fixed when it opens, so each handshake switches to the context of
        the configuration in force, which a reload replaced whole."""
        current = self._tls.get(info.name)
        if current is not None and current is not ctx:
            sslobj.context = current

    # --- services used by connections -------------------------------------------------------
    async def resolve(self, host: str) -> list[str]:
        t0 = time.perf_counter()  # (uvloop's loop.time() ticks in milliseconds)
        try:
            return await self.resolver.resolve(host)
        finally:
            self.metrics.dns_seconds.observe(time.perf_counter() - t0)

    async def dial(self, plan: EgressPlan, pool: ProfilePool, addresses: list[str], port: int) -> Upstream:
        t0 = time.perf_counter()
        try:
            _, up, remote = await self.dialer.connect(plan, addresses, port, self._new_upstream, pool.connect_timeout)
        except SourceUnavailable as err:
            pool.mark_down(plan)
            self.source_state(pool, plan, False)
            log_event("egress_source_down", profile=pool.name, source=plan.source, error=err.detail)
            raise
        self.metrics.connect_seconds.labels(pool.name).observe(time.perf_counter() - t0)  # (cached child)
        if plan.source is not None and pool.is_down(plan):
            pool.mark_up(plan)
            self.source_state(pool, plan, True)
        up.remote = remote
        return up

    def source_state(self, pool: ProfilePool, plan: EgressPlan, up: bool) -> None:
        self.metrics.egress_source_up.labels(pool.name, plan.label).set(1 if up else 0)

    async def check_password(self, peer: str, pending: PendingCheck) -> bool:
        """Run a slow password check off the loop; addresses that keep failing wait longer."""
        count, since = self._failures.get(peer, (0, 0.0))
        now = self.loop.time()
        if count and now - since > 60:
            count = 0
        if count >= 5:
            await asyncio.sleep(min(0.2 * (count - 4), 3.0))
        # Many connections presenting the same new credentials at once (a job's worker pool
        # starting) share one check instead of each running scrypt.
        running = self._checks.get(pending.key)
        if running is None:
            running = self._checks[pending.key] = self.loop.run_in_executor(None, pending.run)
            running.add_done_callback(lambda _f, key=pending.key: self._checks.pop(key, None))
        ok = await asyncio.shield(running)
        if ok:
            self._failures.pop(peer, None)
        else:
            if len(self._failures) > 10000:
                self._failures.clear()
            self._failures[peer] = (count + 1, since if count else now)
        return ok

    def note_rejected(self, addr: str, reason: str = "source_not_allowed") -> None:
        now = self.loop.time()
        if now - self._rejected_logged >= 10.0:  # at most one line per 10 s
            self._rejected_logged = now
            log_event("connection_rejected", client_addr=addr, reason=reason)

    def admit_client(self, client) -> None:
        """Count a connection against its client's limits, or refuse it (429)."""
        name = client.name
        n = self.per_client.get(name, 0)
        if client.max_connections is not None and n >= client.max_connections:
            raise LimitReached(f"client {name} is at its limit of {client.max_connections} concurrent connections")
        rate = client.max_new_per_second
        if rate is not None:
            now = self.loop.time()
            burst = max(1.0, rate)  # a rate below 1/s still admits one connection per 1/rate seconds
            tokens, last = self._buckets.get(name, (burst, now))
            tokens = min(burst, tokens + (now - last) * rate)
            if tokens < 1.0:
                self._buckets[name] = (tokens, now)
                raise LimitReached(f"client {name} is over {rate:g} new connections per second",
                                   reason="rate_limited")
            self._buckets[name] = (tokens - 1.0, now)
        self.per_client[name] = n + 1

    def release_client(self, name: str) -> None:
        n = self.per_client.get(name, 0) - 1
        if n > 0:
            self.per_client[name] = n
        else:
            self.per_client.pop(name, None)

    def _new_upstream(self) -> Upstream:
        return Upstream(self.internal_error)

    def internal_error(self, where: str, exc: BaseException) -> None:
        """A bug caught at a callback, task or timer boundary: counted and logged once."""
        self.metrics.internal_errors.labels(where if where in INTERNAL_ERROR_SITES else "other").inc()
        log_event("internal_error", where=where, error=repr(exc),
                  traceback="".join(traceback.format_exception(exc))[-4000:])

    # --- sweeper (timeouts) -------------------------------------------------------------------
    def _sweep_interval(self, rt: Runtime) -> float:
        t = rt.timeouts
        return max(0.02, min(1.0, t.client_head / 4, t.client_idle / 4, t.upstream_response / 4,
                             t.tunnel_idle / 4, t.exchange_idle / 4))

    async def _sweep(self) -> None:
        while True:
            rt = self.runtime
            await asyncio.sleep(self._sweep_interval(rt))
            now = self.loop.time()
            for conn in list(self.connections):
                try:
                    conn.tick(now, rt)
                except Exception as exc:  # never let one connection stop the sweeper
                    conn._crashed("tick", exc)
            self.pool.sweep(now, rt.timeouts.upstream_idle)

    # --- reload and drain ---------------------------------------------------------------------
    async def apply(self, new: Runtime, change: ListenerChange | None = None) -> None:
        """Swap in ``new`` (listeners prepared by ``prepare_listeners`` unless given)."""
        if change is None:
            change = await self.prepare_listeners(new)  # may raise: then nothing has changed
        old = self.runtime
        adopt_checks(old, new)
        self.runtime = new
        await self.commit_listeners(change)
        self.pool.close_all()  # idle origin connections may use an old egress address
        self._publish(new)
        for hook in self.on_reload:
            hook(old, new)

    def _publish(self, rt: Runtime) -> None:
        m = self.metrics
        m.config_info.clear()
        m.config_info.labels(rt.config_hash).set(1)
        m.config_loaded.set(rt.loaded_at)
        m.egress_source_up.clear()
        for pool in rt.profiles.values():
            for plan in pool.members:
                self.source_state(pool, plan, not pool.is_down(plan))
        self.publish_egress(rt)

    def publish_egress(self, rt: Runtime) -> None:
        m = self.metrics
        m.egress_ip_match.clear()
        m.egress_profile_serving.clear()
        for name, pool in rt.profiles.items():
            m.egress_ip_match.labels(name).set({True: 1, False: 0, None: -1}[pool.ip_matches])
            m.egress_profile_serving.labels(name).set(1 if pool.healthy else 0)

    async def drain(self, grace: float, timeout: float) -> None:
        self.draining = True
        log_event("drain_started", connections=len(self.connections), grace=grace, timeout=timeout)
        if grace > 0:
            await asyncio.sleep(grace)
        for server in self._servers.values():
            server.close()
        deadline = self.loop.time() + timeout
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = len(self.connections)
        for conn in list(self.connections):
            conn.teardown("drain_timeout")  # each unfinished request or tunnel: one record
        self.pool.close_all()
        log_event("drain_finished", closed_unfinished=left)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._servers.values():
            server.close()
        for conn in list(self.connections):
            conn.teardown("shutdown", abort=True)
        self.pool.close_all()
        self._servers.clear()


@dataclass(slots=True)
class ListenerChange:
    """What ``prepare_listeners`` made ready: fresh TLS contexts, newly bound listeners (not yet
    serving), listeners to close, and each listener's TLS mode."""

    contexts: dict[str, ssl.SSLContext]
    bound: dict[str, tuple]
    removed: list[str]
    modes: dict[str, str]
    renamed: dict[str, str]

    def abandon(self) -> None:
        for server, _ in self.bound.values():
            server.close()


def adopt_checks(old: Runtime, new: Runtime) -> None:
    """Carry egress-IP checks over to a new runtime for members that did not change."""
    for name, pool in new.profiles.items():
        previous = old.profiles.get(name)
        if previous is not None and previous is not pool:
            pool.adopt(previous)


def _bound_name(server) -> str | None:
    for sock in server.sockets:
        host, port = sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return None


def _tls_mode(spec) -> str:
    if spec.tls is None:
        return "plain"
    return "mtls" if spec.tls.client_ca else "tls"


def server_tls_context(tls) -> ssl.SSLContext:
    """A new server context from a ``TLSConfig``: raises if the certificate, key or CA cannot be
    loaded or the key does not match the certificate. Never mutated once built."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(tls.cert, tls.key)
    if tls.client_ca:
        ctx.load_verify_locations(tls.client_ca)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx
