"""The proxy listeners: bound, TLS contexts built, swapped on reload, closed on drain.

A reload is all or nothing: ``prepare`` builds a fresh TLS context per TLS listener and binds
new listeners (not yet serving), raising ``ConfigError`` and changing nothing if any of that
fails; ``commit`` then applies the change and cannot fail. Live TLS listeners hand every new
handshake the context of the configuration in force (``_pick_tls``, an SNI callback).

``own`` is the set of addresses no request may be sent to: our proxy and admin listeners.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from ..egress.localaddr import local_addresses
from ..errors import ConfigError
from ..model import parse_socket_address
from ..observe.metrics import ListenerCounts, Metrics
from ..policy.guard import OwnListeners
from .runtime import Runtime


@dataclass(slots=True)
class ListenerInfo:
    name: str  # the configured address, e.g. "127.0.0.1:3128"
    tls: bool
    counts: ListenerCounts | None = None  # its open connections and tunnels (observe.metrics, plain ints)
    protocol: str = "http"  # "http" or "socks5" (a reload may change it for new connections)

    def default_profile(self, rt: Runtime) -> str:
        listener = rt.listeners.get(self.name)
        return listener.egress if listener is not None else "default"


class Listeners:
    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Metrics,
                 factory: Callable[[ListenerInfo], asyncio.Protocol], reuse_port: bool = False) -> None:
        self.loop = loop
        self.metrics = metrics
        self._factory = factory
        self.reuse_port = reuse_port
        self._servers: dict[str, asyncio.base_events.Server] = {}
        self._tls: dict[str, ssl.SSLContext] = {}  # the context in force per TLS listener
        self._tls_mode: dict[str, str] = {}
        self._infos: dict[str, ListenerInfo] = {}
        self.own = OwnListeners()  # our own listening sockets: never a destination
        self.admin_sockets: list[tuple[str, int]] = []  # set by the app (the admin listener)

    @property
    def names(self) -> list[str]:
        return list(self._servers)

    def bound_addresses(self) -> list[str]:
        """The addresses actually bound (a configured port 0 becomes the kernel's choice)."""
        out = []
        for server in self._servers.values():
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return out

    async def prepare(self, rt: Runtime) -> ListenerChange:
        """Everything about ``rt``'s listeners that can fail, done before anything changes: a
        fresh TLS context per TLS listener (certificate, key and CA loaded and matched), and
        new listeners bound (not yet serving). Raises ``ConfigError`` and leaves the gateway as
        it was; ``commit`` then applies the change and cannot fail."""
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
            info = ListenerInfo(name, spec.tls is not None, self.metrics.listener(name), spec.protocol)
            ctx = contexts.get(name)
            if ctx is not None:
                ctx.sni_callback = functools.partial(self._pick_tls, info)
            try:
                bound[name] = (await self.loop.create_server(
                    lambda info=info: self._factory(info), host, port, ssl=ctx, backlog=4096,
                    reuse_port=self.reuse_port or None, start_serving=False), info)
            except OSError as exc:
                for server, _ in bound.values():
                    server.close()
                raise ConfigError([f"{rt.source}:0: listen[{i}].address: cannot listen on {name}: "
                                   f"{exc.strerror or exc}"]) from None
        modes = {spec.address: _tls_mode(spec) for spec in rt.config.listen}
        removed = [n for n in self._servers if n not in wanted and n not in renamed]
        return ListenerChange(contexts, bound, removed, modes, renamed,
                              {spec.address: spec.protocol for spec in rt.config.listen})

    async def commit(self, change: ListenerChange) -> None:
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
        for name, info in self._infos.items():  # new connections speak the protocol in force
            info.protocol = change.protocols.get(name, info.protocol)
        self._tls.update(change.contexts)  # live listeners hand new handshakes the new context
        self._tls_mode = change.modes
        for name, (server, info) in change.bound.items():
            self._servers[name] = server
            self._infos[name] = info
            await server.start_serving()
        self.metrics.listener_info.clear()
        for name, info in self._infos.items():
            self.metrics.listener_info.labels(name, info.protocol).set(1)
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

    def close(self) -> None:
        """Stop accepting (drain and shutdown); open connections are not touched."""
        for server in self._servers.values():
            server.close()

    def forget(self) -> None:
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
    protocols: dict[str, str] = field(default_factory=dict)  # listener -> "http" / "socks5"

    def abandon(self) -> None:
        for server, _ in self.bound.values():
            server.close()


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
