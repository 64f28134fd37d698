"""``ClientConnection``: the protocol object of one client connection.

Lifecycle: the client gate (source address) at ``connection_made``; request heads parsed
with llhttp; each request becomes an ``Exchange`` queued in arrival order (pipelining), the
first one being served. Serving a request is the only async step (``_serve``): identify the
client, decide, resolve, guard, dial. Then either a CONNECT ``Tunnel`` takes over the
connection or the ``Exchange`` streams the request and response; when it is done the next
queued request starts (keep-alive) or the connection closes.

Reading from the client is paused for independent, named reasons (``flow.Pause``): request
bytes buffered before the upstream is ready, the upstream's write buffer full, unparsed bytes
waiting (too many pipelined requests, or a large read parsed in steps so one connection
cannot hold the event loop), a tunnel spliced. Reading resumes only when no reason is left.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING

from ..errors import (
    AddressProhibited,
    AuthRequired,
    ClientTimeout,
    EgressUnverified,
    GatewayError,
    PolicyDenied,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from ..http1 import proxy_protocol
from ..http1.parse import RequestHead, RequestParser
from ..http1.responses import CONNECT_OK, error_response, simple_response
from ..http1.rewrite import parse_absolute_target
from ..model import AccessRecord, HostPort
from ..policy.clients import Identity, PendingCheck
from ..policy.decide import choose_profile, decide
from ..policy.guard import OwnListeners
from .flow import PIPELINE_LIMIT, SLICE, WORK_PER_TURN, Pause
from .forward import DONE, NEW, RESPONDING, SENDING, Exchange
from .tunnel import BULK, Tunnel
from .upstream import Upstream

if TYPE_CHECKING:
    from ..egress.plan import ProfilePool
    from .runtime import Runtime
    from .server import Gateway, ListenerInfo

WHOAMI_HOST = "egressgate.whoami"
BUFFER_LIMIT = 256 * 1024  # request bytes held per connection before the client is paused
FLUSH_GRACE = 10.0  # seconds a closed connection may take to flush its last bytes, then it is reset
LINGER_SECONDS, LINGER_BYTES = 2.0, 1 << 20  # after an error answer, what we read and discard at most


class ClientConnection(asyncio.Protocol):
    __slots__ = ("gw", "listener", "transport", "peer", "parser", "queue", "tunnel", "early", "held",
                 "paused", "since", "head_started", "served", "closed", "eof", "identity", "identity_key",
                 "cert_subject", "client_name", "counted", "pp_buf", "backlog", "dirty", "work", "__weakref__")

    def __init__(self, gw: Gateway, listener: ListenerInfo) -> None:
        self.gw = gw
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        self.parser: RequestParser | None = None
        self.queue: list[Exchange] = []  # a list, not a deque: 56 bytes idle instead of 760
        self.tunnel: Tunnel | None = None
        self.early: Exchange | None = None  # a CONNECT waiting for its tunnel: bytes go to its buffer
        self.held = 0  # request bytes buffered, all exchanges
        self.paused = 0
        self.since = 0.0
        self.head_started: float | None = None
        self.served = 0
        self.closed = False
        self.eof = False
        self.identity: Identity | None = None
        # (runtime, Proxy-Authorization) the identity was found under. The runtime object itself,
        # not id(): a freed runtime's address is reused, and an identity from an old, wider
        # config must never match a new one.
        self.identity_key: tuple | None = None
        self.cert_subject: str | None = None
        self.client_name: str | None = None
        self.counted: str | None = None  # the client this connection counts against (limits)
        self.pp_buf: bytes | None = None  # collecting a PROXY protocol header
        self.backlog = b""  # bytes read but not parsed yet (Pause.BACKLOG)
        self.dirty: list[Exchange] = []  # exchanges with request bytes to write upstream after this read
        self.work = 0  # parser events in this turn (see _parse_in_steps)

    # --- asyncio.Protocol -----------------------------------------------------------------
    # Every callback below catches what escapes it: a bug in one connection closes that
    # connection (``_crashed``: counted, logged once, every transport closed), never leaks a
    # descriptor and never reaches the event loop.
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        try:
            self._admit(transport)
        except Exception as exc:
            self._crashed("connection_made", exc)

    def _admit(self, transport: asyncio.BaseTransport) -> None:
        gw = self.gw
        peer = transport.get_extra_info("peername")
        if not peer:  # reset before we could ask who it was: nothing to answer, nothing to keep
            gw.metrics.rejected_connections.labels("peer_gone").inc()
            self._abort()
            return
        addr = peer[0]
        if addr.startswith("::ffff:") and "." in addr:
            addr = addr[7:]
        self.peer = addr
        rt = gw.runtime
        trusted = rt.proxy_protocol.get(self.listener.name)
        if trusted is not None:
            # Behind a TCP load balancer: only it may connect, and it says who the client is.
            if not _in_networks(addr, trusted):
                gw.metrics.rejected_connections.labels("untrusted_proxy").inc()
                gw.note_rejected(addr, "untrusted_proxy")
                self.closed = True
                transport.abort()
                return
            self.pp_buf = b""
        elif not rt.clients.admits(addr):
            gw.metrics.rejected_connections.labels("source_not_allowed").inc()
            gw.note_rejected(addr)
            self.closed = True
            transport.abort()
            return
        if len(gw.connections) >= rt.limits.max_connections:
            gw.metrics.rejected_connections.labels("max_connections").inc()
            self.closed = True
            transport.write(error_response(Unavailable("the gateway is at its connection limit",
                                                       reason="max_connections")))
            transport.close()
            return
        gw.connections.add(self)
        self.listener.connections.inc()
        self.parser = RequestParser(self, rt.limits.max_head_bytes, rt.limits.max_headers)
        self.since = gw.loop.time()
        if self.listener.tls:
            self.cert_subject = _subject_cn(transport.get_extra_info("peercert"))

    def data_received(self, data: bytes) -> None:
        try:
            t = self.tunnel
            if t is not None:
                t.up.write(data)
                t.bytes_up += len(data)
                t.active = True
                if len(data) >= BULK and not t.copy_only:
                    t.go_bulk()
                return
            self._received(data)
        except Exception as exc:
            self._crashed("data_received", exc)

    def _received(self, data: bytes) -> None:
        if self.closed:  # lingering after an error answer: discard, within a bound
            self.held += len(data)
            if self.held > 0:
                self.transport.abort()
            return
        if self.pp_buf is not None:
            self._proxy_header(data)
            return
        if self.early is not None:
            self._early_data(data)
            return
        if self.backlog:
            data, self.backlog = self.backlog + data, b""
        if len(data) <= SLICE:
            self._parse(data)  # the common case: one step
        else:
            self._parse_in_steps(data)
        dirty = self.dirty
        if dirty:  # each exchange's body bytes from this read go upstream in one write
            self.dirty = []
            for ex in dirty:
                ex.flush_up()

    def _parse(self, data: bytes) -> bool:
        """Feed the request parser; False once no more HTTP follows (a tunnel, or closed)."""
        if not self.queue and self.head_started is None:
            self.head_started = self.gw.loop.time()
        try:
            rest = self.parser.feed(data)
        except GatewayError as err:
            self._protocol_error(err)
            return False
        if rest is not None and self.early is not None:
            if rest:
                self._early_data(rest)
            self.parser = None  # a tunnel follows; no more HTTP on this connection
            return False
        return not self.closed

    def _parse_in_steps(self, data: bytes) -> None:
        """A large read is parsed a slice at a time: reading stops (``Pause.BACKLOG``, the rest
        kept) while more than PIPELINE_LIMIT requests wait, and once a turn has produced
        WORK_PER_TURN parser events the loop is yielded to other connections, so neither
        memory for queued requests nor the Python work one read causes (1-byte chunks, say)
        is unbounded. A body in large pieces costs one event per slice and never yields."""
        pos, n = 0, len(data)
        self.work = 0
        for _ in range(n // SLICE + 1):
            piece = data[pos:pos + SLICE]
            pos += SLICE
            if not self._parse(piece):
                if pos < n and self.early is not None:
                    self._early_data(data[pos:])
                return
            if pos >= n:
                return
            if len(self.queue) > PIPELINE_LIMIT or self.work >= WORK_PER_TURN:
                self.backlog = data[pos:]
                self.pause_reading(Pause.BACKLOG)
                if len(self.queue) <= PIPELINE_LIMIT:
                    self.gw.loop.call_soon(self._resume_backlog)  # our turn is over, not our reading
                return

    def _resume_backlog(self) -> None:
        try:
            if self.closed or not self.paused & Pause.BACKLOG or len(self.queue) > PIPELINE_LIMIT:
                return
            data, self.backlog = self.backlog, b""
            self.resume_reading(Pause.BACKLOG)
            if data:
                self._received(data)
        except Exception as exc:
            self._crashed("data_received", exc)

    def _early_data(self, data: bytes) -> None:
        """Bytes after a CONNECT head, before its tunnel is up: kept for the tunnel."""
        ex = self.early
        ex.body.append(data)
        ex.body_bytes += len(data)
        self.buffered(len(data))

    def _proxy_header(self, data: bytes) -> None:
        gw = self.gw
        buf = self.pp_buf + data
        try:
            found = proxy_protocol.parse(buf)
        except GatewayError:
            found = False
        if found is None and len(buf) <= 600:
            self.pp_buf = buf
            return
        if not found:
            gw.metrics.rejected_connections.labels("proxy_protocol").inc()
            self._abort()
            return
        consumed, addr = found
        self.pp_buf = None
        if addr is not None:
            self.peer = addr[7:] if addr.startswith("::ffff:") and "." in addr else addr
        if not gw.runtime.clients.admits(self.peer):
            gw.metrics.rejected_connections.labels("source_not_allowed").inc()
            gw.note_rejected(self.peer)
            self._abort()
            return
        rest = buf[consumed:]
        if rest:
            self._received(rest)

    def _abort(self) -> None:
        self.closed = True
        self.transport.abort()

    def eof_received(self) -> bool:
        self.eof = True
        try:
            if self.tunnel is not None:
                return self.tunnel.client_eof()
            if self.queue and self.queue[0].request_done:
                return True  # the request is complete; answer it, then close
        except Exception as exc:
            self._crashed("eof_received", exc)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._lost(exc)
        except Exception as bug:
            self._crashed("connection_lost", bug)

    def _lost(self, exc: Exception | None) -> None:
        if not self.closed and not self.queue and self.head_started is not None and self.tunnel is None:
            # The client hung up part-way through a request head: still one record.
            rec = AccessRecord(self.peer, self.listener.name, time.time() - (self.gw.loop.time() - self.head_started),
                               reason="client_closed" if exc is None else "client_reset")
            self._log_record(rec, 499)
        self.closed = True
        if self.tunnel is not None:
            self.tunnel.end("client_closed" if exc is None else "client_reset")
        queue, self.queue = self.queue, []
        for ex in queue:
            if ex.task is not None and not ex.task.done():
                ex.task.cancel()
            if ex.upstream is not None and ex.state != DONE:
                ex.upstream.detach()
                ex.upstream.transport.abort()  # unfinished: nothing of it needs flushing
            if not ex.ended and (ex.task is not None or ex.state != NEW):  # it was being served
                ex.record.reason = ex.record.reason or ("client_closed" if exc is None else "client_reset")
                self._log(ex, 499)
        self._forget()

    def _forget(self) -> None:
        if self.counted is not None:
            self.gw.release_client(self.counted)
            self.counted = None
        if self in self.gw.connections:
            self.gw.connections.discard(self)
            self.listener.connections.dec()

    def pause_writing(self) -> None:
        try:
            if self.tunnel is not None:
                self.tunnel.client_pause_writing()
            elif self.queue and self.queue[0].upstream is not None:
                self.queue[0].upstream.transport.pause_reading()
        except Exception as exc:
            self._crashed("pause_writing", exc)

    def resume_writing(self) -> None:
        try:
            if self.tunnel is not None:
                self.tunnel.client_resume_writing()
            elif self.queue and self.queue[0].upstream is not None:
                up = self.queue[0].upstream.transport
                if not up.is_closing():
                    up.resume_reading()
        except Exception as exc:
            self._crashed("resume_writing", exc)

    def _crashed(self, where: str, exc: BaseException) -> None:
        """A bug surfaced in one of this connection's callbacks (or in its tunnel's, its
        exchange's or a timer): count it, log it once, and close everything it holds."""
        self.gw.internal_error(where, exc)
        try:
            self.teardown("internal_error", abort=True)
        except Exception as again:  # never let the clean-up itself escape
            self.gw.internal_error("teardown", again)
            if self.transport is not None:
                self.transport.abort()
            self._forget()

    def teardown(self, reason: str, abort: bool = False) -> None:
        """Close this connection now, and everything it holds: its tunnel, the upstream
        connections of queued exchanges, their tasks. Each unfinished request or tunnel gets
        its one access record with ``reason`` and the bytes moved so far. Used for bugs
        (``internal_error``) and by drain (``drain_timeout``)."""
        if self.tunnel is not None:
            self.tunnel.end(reason)
        elif not self.queue and self.head_started is not None and not self.closed:
            self._log_record(AccessRecord(self.peer, self.listener.name, time.time() - (
                self.gw.loop.time() - self.head_started), reason=reason), 503)
        queue, self.queue = self.queue, []
        for ex in queue:
            if ex.task is not None and not ex.task.done():
                ex.task.cancel()
            up = ex.upstream
            if up is not None:
                up.detach()
                up.transport.abort() if abort else up.transport.close()
            if not ex.ended:
                ex.state = DONE
                ex.record.reason = reason
                self._log(ex, ex.record.status if ex.response_started else 503)
        self.early = None
        self.closed = True
        if self.transport is not None:
            self.transport.abort() if abort else self.transport.close()
        self._forget()

    # --- back-pressure on the client ------------------------------------------------------
    def pause_reading(self, bit: Pause) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused |= bit

    def resume_reading(self, bit: Pause) -> None:
        if not self.paused & bit:
            return
        self.paused &= ~bit
        if not self.paused and not self.closed and not self.transport.is_closing():
            self.transport.resume_reading()

    def buffered(self, n: int) -> None:
        self.held += n
        if self.held > BUFFER_LIMIT:
            self.pause_reading(Pause.BUFFERED)

    def unbuffered(self, n: int) -> None:
        self.held -= n
        if self.held <= BUFFER_LIMIT // 2:
            self.resume_reading(Pause.BUFFERED)

    # --- parser sink ----------------------------------------------------------------------
    def on_request_head(self, head: RequestHead) -> None:
        self.work += 8
        rec = AccessRecord(self.peer, self.listener.name, time.time(), method=head.method,
                           target=head.target[:2048])
        ex = Exchange(self, head, rec)
        self.queue.append(ex)
        self.head_started = None
        if ex.connect:
            self.early = ex
        if len(self.queue) == 1:
            self._start(ex)

    def on_request_body(self, data: bytes) -> None:
        self.work += 1
        if self.queue:  # (empty: the request was already answered, e.g. refused at its head)
            self.queue[-1].request_body(data)

    def on_request_end(self) -> None:
        if self.queue:  # (empty: as above; requests are answered in order, so none is skipped)
            self.queue[-1].request_end()

    # --- serving a request ----------------------------------------------------------------
    def _start(self, ex: Exchange) -> None:
        rt = ex.runtime = self.gw.runtime
        try:
            if self._serve_now(ex, rt):
                return
        except GatewayError as err:
            self.exchange_failed(ex, err)
            return
        except Exception as exc:  # a bug: answer 500 and keep serving others
            self._internal_failure(ex, "serve", exc)
            return
        ex.task = self.gw.loop.create_task(self._serve(ex))

    def _serve_now(self, ex: Exchange, rt: Runtime) -> bool:
        """The hot path, without a task: a keep-alive request whose client is already known,
        whose destination needs no lookup, and for which an idle upstream connection waits.
        Returns False when something must be awaited (``_serve`` then does it all)."""
        if ex.connect:
            return False
        identity = self.identity
        key = self.identity_key
        if identity is None or key[0] is not rt or key[1] != ex.head.proxy_authorization:
            return False
        route = self._route(ex, rt, identity)
        if route is None:
            return True  # answered by the gateway itself
        pool, dest, client = route
        if pool.kind == "upstream":
            return False
        addresses = [dest.host] if dest.is_ip else self.gw.resolver.cached(dest.host)
        if addresses is None:
            return False
        allowed = _guard(rt, dest, addresses, client, self.gw.own, ex.record)
        take = self.gw.pool.take
        for plan in pool.plans(client.name):
            up = take((plan.key, allowed[0], dest.port))
            if up is not None:
                self._begin(ex, up, True, None)
                return True
            break
        return False

    async def _serve(self, ex: Exchange) -> None:
        try:
            await self._serve_inner(ex)
        except GatewayError as err:
            try:
                self.exchange_failed(ex, err)
            except Exception as exc:
                self._crashed("exchange_failed", exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: answer 500 and keep serving others
            self._internal_failure(ex, "serve", exc)

    def _internal_failure(self, ex: Exchange, where: str, exc: BaseException) -> None:
        """A bug while serving one request: count it and answer 500; if even that fails, the
        connection is closed (``_crashed``)."""
        self.gw.internal_error(where, exc)
        try:
            self.exchange_failed(ex, GatewayError(f"internal error: {type(exc).__name__}"))
        except Exception as again:
            self._crashed("exchange_failed", again)

    async def _serve_inner(self, ex: Exchange) -> None:
        rt = ex.runtime
        identity = await self._identify(rt, ex.head, ex.record)
        route = self._route(ex, rt, identity)
        if route is None:
            return
        pool, dest, client = route
        if pool.kind == "upstream":
            await self._via_upstream_proxy(ex, pool, dest, client.name)
        else:
            await self._direct(ex, rt, pool, dest, client)

    def _route(self, ex: Exchange, rt: Runtime, identity: Identity):
        """Target, policy decision and profile for a request (pure apart from answering
        ``egressgate.whoami`` itself, in which case it returns None)."""
        head = ex.head
        rec = ex.record
        client = identity.client
        rec.client = client.name
        if ex.connect:
            dest = HostPort.parse_authority(head.target)
        else:
            ex.target = parse_absolute_target(head.target)
            dest = ex.target.dest
        if dest.host == WHOAMI_HOST:
            self._whoami(ex, rt, identity)
            return None
        requested = identity.requested_profile
        if requested is None and head.profile:
            requested = head.profile.decode("latin-1").strip()
        decision = decide(client, dest, ex.connect, requested, self.listener.default_profile(rt),
                          rt.connect_ports)
        rec.profile = _clip(decision.profile) if decision.profile else "-"
        if not decision.allow:
            kind = AddressProhibited if decision.reason == "destination_ip_prohibited" else PolicyDenied
            if decision.reason == "profile_not_allowed":
                detail = f"profile {_clip(decision.profile)!r} is not allowed for client {client.name} ({decision.rule})"
            else:
                detail = f"{dest} for client {client.name} ({decision.rule})"
            raise kind(f"{decision.reason}: {detail}", reason=decision.reason)
        if decision.report_only:
            rec.extra = {"would_deny": decision.reason}
            self.gw.metrics.would_deny.labels(client.name, decision.reason).inc()
        pool = rt.profiles[decision.profile]
        if not pool.healthy:  # fail closed: never leave from an IP the config does not promise
            reason, detail = pool.refusal()
            raise EgressUnverified(detail, reason=reason)
        return pool, dest, client

    async def _identify(self, rt: Runtime, head: RequestHead, rec: AccessRecord) -> Identity:
        auth = head.proxy_authorization
        key = (rt, auth)
        if self.identity is not None and self.identity_key[0] is rt and self.identity_key[1] == auth:
            return self.identity
        result = rt.clients.identify(self.peer, auth, self.cert_subject)
        if isinstance(result, PendingCheck):
            ok = await self.gw.check_password(self.peer, result)
            result = rt.clients.identify(self.peer, auth, self.cert_subject) if ok else None
            if not isinstance(result, Identity):
                raise AuthRequired("wrong proxy credentials", reason="bad_credentials")
        if self.counted != result.client.name:
            rec.client = result.client.name  # (a 429 below names who was refused)
            self.gw.admit_client(result.client)  # raises LimitReached (429)
            if self.counted is not None:
                self.gw.release_client(self.counted)
            self.counted = result.client.name
        self.identity = result
        self.identity_key = key
        self.client_name = result.client.name
        return result

    async def _direct(self, ex: Exchange, rt: Runtime, pool: ProfilePool, dest: HostPort, client) -> None:
        gw = self.gw
        addresses = [dest.host] if dest.is_ip else await gw.resolve(dest.host)
        allowed = _guard(rt, dest, addresses, client, self.gw.own, ex.record)
        last: GatewayError | None = None
        for plan in pool.plans(client.name):
            if not ex.connect:
                key = (plan.key, allowed[0], dest.port)
                up = gw.pool.take(key)
                if up is not None:
                    self._begin(ex, up, True, None)
                    return
            try:
                up = await gw.dial(plan, pool, allowed, dest.port)
            except UpstreamError as err:
                if err.reason != "source_unavailable":
                    raise
                last = err
                continue
            if not ex.connect:
                up.key = (plan.key, up.remote, dest.port)
            self._begin(ex, up, False, None)
            return
        raise last or UpstreamError("no usable egress address in profile " + pool.name)

    async def _via_upstream_proxy(self, ex: Exchange, pool: ProfilePool, dest: HostPort, client: str) -> None:
        """Through a chained proxy, which resolves the name itself (its DNS view may differ from
        ours): the address guard applies to IP-literal destinations here; names are judged by
        the policy (metadata names included) and by the chained proxy."""
        gw = self.gw
        if dest.is_ip and (why := ex.runtime.guard.check(dest.host) or (
                "this gateway's own listener" if gw.own.contains(dest.host, dest.port) else None)) is not None:
            raise AddressProhibited(f"{dest.host}: {why.replace('_', ' ')} address")
        last: GatewayError | None = None
        for plan in pool.plans(client):
            proxy = plan.upstream
            try:
                if not ex.connect:
                    up = gw.pool.take((plan.key, str(proxy.address), 0))
                    if up is not None:
                        self._begin(ex, up, True, proxy)
                        return
                addresses = [proxy.address.host] if proxy.address.is_ip else await gw.resolve(proxy.address.host)
                up = await gw.dial(plan, pool, addresses, proxy.address.port)
            except UpstreamError as err:
                pool.mark_down(plan)
                gw.source_state(pool, plan, False)
                last = err
                continue
            pool.mark_up(plan)
            if ex.connect:
                leftover = await _upstream_connect(up, dest, proxy.authorization, ex.runtime.timeouts.upstream_connect)
                self._begin(ex, up, False, proxy, leftover)
            else:
                up.key = (plan.key, str(proxy.address), 0)
                self._begin(ex, up, False, proxy)
            return
        raise last or UpstreamError("no upstream proxy of profile " + pool.name + " is reachable")

    def _begin(self, ex: Exchange, up: Upstream, reused: bool, chained, leftover: bytes = b"") -> None:
        if self.closed:
            up.transport.close()
            return
        if ex.connect:
            self._open_tunnel(ex, up, leftover)
        else:
            if up.key is not None:
                ex.pool_key = up.key
            ex.start(up, reused, chained, self.gw.loop.time())

    def _open_tunnel(self, ex: Exchange, up: Upstream, leftover: bytes) -> None:
        gw = self.gw
        rec = ex.record
        rec.status = 200
        rec.upstream_addr = up.remote
        rec.egress_addr = up.local
        self.transport.write(CONNECT_OK)
        t = Tunnel(self, up, rec, gw.loop.time())
        self.tunnel = t
        self.early = None
        self.queue.clear()  # the tunnel keeps only its record: an idle tunnel stays small
        self.identity = None
        if leftover:
            t.upstream_data(leftover)
        for chunk in ex.body:
            t.up.write(chunk)
            t.bytes_up += len(chunk)
        if ex.body_bytes:
            self.unbuffered(ex.body_bytes)
        ex.body = []
        ex.ended = True
        self.listener.tunnels.inc()
        if self.eof:
            t.client_eof()

    def tunnel_ended(self, t: Tunnel, reason: str) -> None:
        self.closed = True
        self.listener.tunnels.dec()
        rec = t.record
        rec.bytes_up = t.bytes_up
        rec.bytes_down = t.bytes_down
        rec.reason = reason
        self._log_record(rec, 200)

    def _whoami(self, ex: Exchange, rt: Runtime, identity: Identity) -> None:
        client = identity.client
        name = choose_profile(client, identity.requested_profile, self.listener.default_profile(rt))
        pool = rt.profiles.get(name) if name else None
        doc = {
            "client": client.name, "client_addr": self.peer, "profile": name,
            "profiles": list(client.profiles or (self.listener.default_profile(rt),)),
            "egress": _describe(pool) if pool else None,
            "expect_ip": list(pool.expect_ip) if pool else [],
            "observed_ip": pool.observed_ip if pool else None,
            "ip_matches": pool.ip_matches if pool else None,
            "serving": pool.healthy if pool else None,
            "refusal": (pool.refusal() or (None, None))[1] if pool else None,
            "allow": list(client.allow_patterns) if client.allow_patterns is not None else None,
            "deny": list(client.deny_patterns),
        }
        ex.record.status = 200
        ex.record.profile = name or "-"
        keep = ex.head.keep_alive and not self.gw.draining
        response = simple_response(200, json.dumps(doc, indent=1).encode() + b"\n", keep_alive=keep)
        ex.record.bytes_down = len(response)
        self.transport.write(response)
        ex.state = DONE
        ex.client_keep = keep
        self.exchange_done(ex)

    # --- outcomes -----------------------------------------------------------------------
    def request_sent(self, ex: Exchange) -> None:
        """The whole request body went upstream (nothing to do; hook for timing)."""

    def exchange_done(self, ex: Exchange) -> None:
        if self.queue and self.queue[0] is ex:
            self.queue.pop(0)
        up = ex.upstream
        if up is not None:
            if ex.upstream_keep and ex.request_done and ex.pool_key is not None and ex.response_started \
                    and not ex.up_out:
                self.gw.pool.put(up, ex.pool_key, self.gw.loop.time())
            else:
                up.detach()
                up.transport.close()
        self._log(ex, ex.record.status)
        self._next(ex.client_keep and ex.request_done)

    def exchange_failed(self, ex: Exchange, err: GatewayError) -> None:
        if ex.ended:
            return
        ex.state = DONE
        if self.queue and self.queue[0] is ex:
            self.queue.pop(0)
        rec = ex.record
        rec.reason = err.reason
        gw = self.gw
        if err.status in (403, 407, 429):
            gw.metrics.denied.labels(err.reason).inc()
            gw.recent_denials.append({"ts": time.strftime("%H:%M:%S"), "client": rec.client,
                                      "target": rec.target[:200], "reason": err.reason})
        elif err.status >= 500:
            gw.metrics.upstream_errors.labels(err.reason).inc()
        if ex.upstream is not None:
            ex.upstream.detach()
            ex.upstream.transport.abort()  # failed: an origin that stopped reading must not hold it
        if self.closed:
            self._log(ex, err.status)
            return
        if ex.response_started:
            # Too late for an error response: the client sees the response cut short.
            self._log(ex, rec.status)
            self._close()
            return
        # (a request refused at its head, with no body to come, is as good as complete)
        keep = (err.status in (403, 407, 429) and (ex.request_done or not ex.head.has_body)
                and ex.head.keep_alive and not ex.body
                and not gw.draining and not self.eof)
        self.transport.write(error_response(err, keep))
        self._log(ex, err.status)
        if ex is self.early:
            self.early = None
            if keep:  # e.g. a 407 to CONNECT: the client may retry on this connection
                limits = ex.runtime.limits
                self.parser = RequestParser(self, limits.max_head_bytes, limits.max_headers)
        self._next(keep)

    def retry_fresh(self, ex: Exchange) -> None:
        """A reused upstream failed before answering: dial a fresh one, once."""
        ex.state = 0
        ex.reused = False
        ex.upstream = None
        ex.pool_key = None
        ex.record.upstream_addr = "-"
        ex.task = self.gw.loop.create_task(self._serve(ex))

    def _next(self, keep: bool) -> None:
        if not keep or self.closed:
            self._close()
            return
        self.served += 1
        self.since = self.gw.loop.time()
        if self.backlog and len(self.queue) <= PIPELINE_LIMIT:
            self.gw.loop.call_soon(self._resume_backlog)
        if self.queue:
            self._start(self.queue[0])
        elif self.eof:
            self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()
            if self.transport.get_write_buffer_size():
                # close() waits for the write buffer to drain; a client that never reads must
                # not hold the connection (and its descriptor) forever.
                self.gw.loop.call_later(FLUSH_GRACE, self.transport.abort)
        self._close_queue()

    def _close_queue(self) -> None:
        for ex in self.queue:
            if ex.upstream is not None:
                ex.upstream.detach()
                ex.upstream.transport.abort()
        self.queue.clear()

    def _protocol_error(self, err: GatewayError) -> None:
        """The client's bytes are not acceptable HTTP: answer if no response has begun, then
        close (lingering, so the answer is not lost to a reset while the client still sends).
        Every request of the connection that was being served gets its record."""
        ex = self.queue[-1] if self.queue else None
        answer = ex is None or (not ex.response_started and len(self.queue) == 1)
        if answer:
            if ex is not None:
                if ex.task is not None:
                    ex.task.cancel()
                if ex.upstream is not None:
                    ex.upstream.detach()
                    ex.upstream.transport.abort()
                ex.state = DONE
            rec = ex.record if ex else AccessRecord(self.peer, self.listener.name, time.time())
            rec.reason = err.reason
            self.transport.write(error_response(err))
            self.gw.metrics.count_request(self.client_name or "-", rec.profile, rec.method, err.status)
            rec.status = err.status
            self.gw.access_log.write(rec)
            if ex is not None:
                ex.ended = True
        for other in self.queue:
            if not other.ended and (other.task is not None or other.state != NEW):
                other.record.reason = err.reason
                self._log(other, other.record.status if other.response_started else err.status)
        if answer and self.transport.can_write_eof() and not self.transport.is_closing():
            self._linger()
        else:
            self._close()

    def _linger(self) -> None:
        """Half-close after an error answer and discard what the client still sends, for at
        most LINGER_SECONDS or LINGER_BYTES, then close (as web servers' lingering close)."""
        self._close_queue()
        self.closed = True
        self.parser = None
        self.early = None
        self.backlog = b""
        t = self.transport
        t.write_eof()
        self.held = -LINGER_BYTES  # counts discarded bytes up from here (see _received)
        self.gw.loop.call_later(LINGER_SECONDS, t.abort)
        if self.paused:
            self.paused = Pause(0)
            t.resume_reading()

    def _log(self, ex: Exchange, status: int) -> None:
        if ex.ended:
            return
        ex.ended = True
        self._log_record(ex.record, status)

    def _log_record(self, rec: AccessRecord, status: int) -> None:
        rec.status = status
        gw = self.gw
        gw.metrics.count_request(rec.client, rec.profile, rec.method, status)
        gw.metrics.count_bytes(rec.profile, rec.bytes_up, rec.bytes_down)
        gw.access_log.write(rec)

    # --- timeouts (called by the server's sweeper) ----------------------------------------
    def _idle_check(self, ex: Exchange, now: float, limit: float) -> None:
        """A forwarded request or response that moved no body byte either way for ``limit``:
        the client stopped sending its body (408), the origin stopped reading it (504), or a
        response stalled, the client not reading or the origin not sending (cut short)."""
        moved = ex.record.bytes_up + ex.record.bytes_down
        if moved != ex.moved:
            ex.moved, ex.idle_since = moved, now
            return
        if now - ex.idle_since <= limit:
            return
        if ex.response_started:
            who = "the client did not read" if self.paused & Pause.UPSTREAM or \
                self.transport.get_write_buffer_size() else "the origin sent nothing"
            ex.fail(UpstreamTimeout(f"the response stalled for {limit:g}s ({who})", reason="idle_timeout",
                                    proxy_status="http_response_timeout"))
        elif self.paused & Pause.UPSTREAM:
            ex.fail(UpstreamTimeout(f"the origin did not read the request body for {limit:g}s",
                                    reason="idle_timeout", proxy_status="http_request_error"))
        else:
            ex.fail(ClientTimeout(f"the request body stalled for {limit:g}s", reason="client_timeout"))

    def tick(self, now: float, rt: Runtime) -> None:
        if self.closed:
            return
        t = self.tunnel
        if t is not None:
            if t.active:
                t.active = False
                t.idle_since = now
            elif now - t.idle_since > rt.timeouts.tunnel_idle:
                t.end("idle_timeout")
            return
        if self.queue:
            ex = self.queue[0]
            if ex.state == SENDING and ex.request_done:
                if now - ex.sent_at > rt.timeouts.upstream_response:
                    ex.fail(UpstreamError(f"no response from the origin within {rt.timeouts.upstream_response:g}s",
                                          reason="response_timeout", status=504,
                                          proxy_status="http_response_timeout"))
            elif ex.state == SENDING or ex.state == RESPONDING:
                self._idle_check(ex, now, rt.timeouts.exchange_idle)
            return
        if self.gw.draining and self.head_started is None:
            self._close()
            return
        if self.head_started is not None:
            if now - self.head_started > rt.timeouts.client_head:
                self._protocol_error(ClientTimeout(
                    f"the request head was not complete within {rt.timeouts.client_head:g}s"))
        elif self.served == 0:
            if now - self.since > rt.timeouts.client_head:
                self._protocol_error(ClientTimeout(f"no request within {rt.timeouts.client_head:g}s"))
        elif now - self.since > rt.timeouts.client_idle:
            self._close()


def _guard(rt: Runtime, dest: HostPort, addresses: list[str], client, own: OwnListeners,
           rec: AccessRecord | None = None) -> list[str]:
    """The resolved addresses a client may reach. The address guard is a safety check (403
    ``destination_ip_prohibited``, never relaxed); the client's own IP deny rules are policy
    (403 ``destination_denied``; in report mode logged and let through)."""
    allowed = []
    refused = ""
    for a in addresses:
        why = rt.guard.check(a) or ("this gateway's own listener" if own.contains(a, dest.port) else None)
        if why is None:
            allowed.append(a)
        elif not refused:
            refused = f"{a} is {why.replace('_', ' ')}"
    if not allowed:
        where = dest.host if dest.is_ip else f"{dest.host} resolves to {refused.split(' ')[0]}"
        raise AddressProhibited(f"{where}: {refused.split(' is ', 1)[-1]} address")
    deny = client.deny
    if deny is not None and not deny.empty:
        kept = [a for a in allowed if deny.match_ip(a, dest.port) is None]
        if not kept:
            rule = deny.match_ip(allowed[0], dest.port)
            if not client.report_only:
                raise PolicyDenied(f"destination_denied: {dest.host} resolves to {allowed[0]} ({rule})",
                                   reason="destination_denied")
            if rec is not None:
                rec.extra = {"would_deny": "destination_denied"}
        else:
            allowed = kept
    return allowed


async def _upstream_connect(up: Upstream, dest: HostPort, authorization: str | None, timeout: float) -> bytes:
    """Open a tunnel through a chained proxy; returns bytes that followed its 200 response."""
    reader = _HeadReader()
    up.attach(reader)
    lines = [f"CONNECT {dest} HTTP/1.1", f"Host: {dest}"]
    if authorization:
        lines.append(f"Proxy-Authorization: {authorization}")
    up.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    try:
        async with asyncio.timeout(timeout):
            head, rest = await reader.done
    except TimeoutError:
        up.transport.close()
        raise UpstreamError("the upstream proxy did not answer CONNECT in time", reason="upstream_timeout",
                            status=504, proxy_status="connection_timeout") from None
    except GatewayError:
        up.transport.close()
        raise
    status_line = head.split(b"\r\n", 1)[0].split(b" ", 2)
    status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 0
    if not 200 <= status < 300:
        up.transport.close()
        raise UpstreamError(f"the upstream proxy refused CONNECT {dest} with {status or 'garbage'}",
                            reason="upstream_refused", proxy_status="proxy_internal_response"
                            if status else "http_protocol_error")
    up.detach()
    return rest


class _HeadReader:
    """Collects an upstream proxy's reply head to our CONNECT."""

    __slots__ = ("done", "buf")

    def __init__(self) -> None:
        self.done: asyncio.Future[tuple[bytes, bytes]] = asyncio.get_running_loop().create_future()
        self.buf = b""

    def upstream_data(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end >= 0 and not self.done.done():
            self.done.set_result((self.buf[:end], self.buf[end + 4:]))
        elif len(self.buf) > 65536 and not self.done.done():
            self.done.set_exception(UpstreamError("oversized reply from the upstream proxy"))

    def upstream_eof(self) -> bool:
        self.upstream_lost(None)
        return False

    def upstream_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(UpstreamError("the upstream proxy closed the connection during CONNECT",
                                                  reason="upstream_closed"))

    def upstream_pause_writing(self) -> None:
        pass

    def upstream_resume_writing(self) -> None:
        pass

    def crashed(self, where: str, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(GatewayError(f"internal error in {where}: {type(exc).__name__}"))


def _describe(pool: ProfilePool) -> dict:
    if pool.kind == "bind":
        return {"kind": "bind", "sources": [m.source for m in pool.members]}
    if pool.kind == "upstream":
        return {"kind": "upstream", "proxies": [str(m.upstream) for m in pool.members]}
    return {"kind": "direct"}


def _clip(name: str, limit: int = 64) -> str:
    """A client-supplied name as it may appear in a response, a record or a label: bounded."""
    return name if len(name) <= limit else name[:limit] + "..."


def _in_networks(address: str, networks) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return any(ip.version == n.version and ip in n for n in networks)


def _subject_cn(cert: dict | None) -> str | None:
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None

