"""``ClientConnection``: the protocol object of one client connection — its asyncio callbacks,
its queue of requests, its timeouts, and one access record per request or tunnel.

What it does not decide itself, it asks: the gate (``gate``) at accept, the parser
(``http1.parse``) for request heads, the client registry and ``limits`` for who is asking,
``route`` for where a request goes, the ``connector`` for an upstream connection; then an
``Exchange`` (``forward``) or a ``Tunnel`` (``tunnel``) moves the bytes, and ``outcomes``
accounts for the result. Flow control is ``flow.FlowControl``.

Requests are served in arrival order (pipelining): the first queued one is being served, the
others wait. Serving is synchronous as long as nothing must be awaited (a known client, a
destination whose addresses are known, an idle upstream connection); the first step that
must wait (a password check, a DNS lookup, a dial) hands the rest to a task.

Every callback catches what escapes it: a bug in one connection closes that connection
(``crashed``: counted, logged once, every transport closed), never leaks a descriptor and
never reaches the event loop.
"""

from __future__ import annotations

import asyncio
import time

from ..errors import AuthRequired, ClientTimeout, GatewayError, Unavailable
from ..http1.parse import RequestHead, RequestParser
from ..http1.responses import CONNECT_OK, error_response
from ..model import AccessRecord
from ..policy.clients import Identity, PendingCheck
from . import gate, whoami
from .connector import Link
from .flow import PIPELINE_LIMIT, SLICE, WORK_PER_TURN, FlowControl, Pause
from .forward import DONE, NEW, ROUTING, Exchange
from .gate import Admission
from .listeners import ListenerInfo
from .route import Route, cached_addresses, resolve_and_judge, route
from .server import Gateway
from .tunnel import Tunnel

FLUSH_GRACE = 10.0  # seconds a closed connection may take to flush its last bytes, then it is reset
LINGER_SECONDS, LINGER_BYTES = 2.0, 1 << 20  # after an error answer, what we read and discard at most


class ClientConnection(asyncio.Protocol):
    __slots__ = ("gw", "listener", "transport", "flow", "peer", "parser", "queue", "tunnel", "early", "since",
                 "head_started", "served", "closed", "eof", "identity", "identity_key", "cert_subject",
                 "client_name", "counted", "pp_buf", "backlog", "dirty", "work", "linger", "__weakref__")

    def __init__(self, gw: Gateway, listener: ListenerInfo) -> None:
        self.gw = gw
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl | None = None
        self.peer = "-"
        self.parser: RequestParser | None = None
        self.queue: list[Exchange] = []  # a list, not a deque: 56 bytes idle instead of 760
        self.tunnel: Tunnel | None = None
        self.early: Exchange | None = None  # a CONNECT waiting for its tunnel: bytes go to its buffer
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
        self.linger = 0  # bytes we still discard after an error answer (see _linger)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.gw.loop

    # --- accept ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow = FlowControl(transport)  # type: ignore[arg-type]
        try:
            self._admit(transport)
        except Exception as exc:
            self.crashed("connection_made", exc)

    def _admit(self, transport: asyncio.BaseTransport) -> None:
        gw = self.gw
        rt = gw.runtime
        verdict, self.peer = gate.admit(transport.get_extra_info("peername"), self.listener.name, rt,
                                        len(gw.connections))
        if verdict is not Admission.ADMIT and verdict is not Admission.READ_PROXY_HEADER:
            gw.gate.refused(verdict, self.peer)
            self.closed = True
            if verdict is Admission.MAX_CONNECTIONS:
                transport.write(error_response(Unavailable("the gateway is at its connection limit",
                                                           reason="max_connections")))
                transport.close()
            else:
                transport.abort()
            return
        if verdict is Admission.READ_PROXY_HEADER:
            self.pp_buf = b""
        gw.connections.add(self)
        self.listener.connections.inc()
        self.parser = RequestParser(self, rt.limits.max_head_bytes, rt.limits.max_headers)
        self.since = gw.loop.time()
        if self.listener.tls:
            self.cert_subject = gate.subject_cn(transport.get_extra_info("peercert"))

    def _proxy_header(self, data: bytes) -> None:
        buf = self.pp_buf + data
        verdict, self.peer, consumed = gate.after_proxy_header(buf, self.peer, self.gw.runtime)
        if verdict is None:
            self.pp_buf = buf
            return
        self.pp_buf = None
        if verdict is not Admission.ADMIT:
            self.gw.gate.refused(verdict, self.peer)
            self._abort()
            return
        rest = buf[consumed:]
        if rest:
            self._received(rest)

    # --- reading --------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        try:
            t = self.tunnel
            if t is not None:
                t.client_data(data)
                return
            self._received(data)
        except Exception as exc:
            self.crashed("data_received", exc)

    def _received(self, data: bytes) -> None:
        if self.closed:  # lingering after an error answer: discard, within a bound
            self.linger -= len(data)
            if self.linger < 0:
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
                self.flow.pause(Pause.BACKLOG)
                if len(self.queue) <= PIPELINE_LIMIT:
                    self.gw.loop.call_soon(self._resume_backlog)  # our turn is over, not our reading
                return

    def _resume_backlog(self) -> None:
        try:
            if self.closed or not self.flow.paused & Pause.BACKLOG or len(self.queue) > PIPELINE_LIMIT:
                return
            data, self.backlog = self.backlog, b""
            self.flow.resume(Pause.BACKLOG)
            if data:
                self._received(data)
        except Exception as exc:
            self.crashed("data_received", exc)

    def _early_data(self, data: bytes) -> None:
        """Bytes after a CONNECT head, before its tunnel is up: kept for the tunnel."""
        ex = self.early
        ex.body.append(data)
        ex.body_bytes += len(data)
        self.flow.buffered(len(data))

    # --- writing: the client's buffer full stops reading from what feeds it -------------
    def pause_writing(self) -> None:
        try:
            if self.tunnel is not None:
                self.tunnel.client_pause_writing()
            elif self.queue and self.queue[0].upstream is not None:
                self.queue[0].upstream.transport.pause_reading()
        except Exception as exc:
            self.crashed("pause_writing", exc)

    def resume_writing(self) -> None:
        try:
            if self.tunnel is not None:
                self.tunnel.client_resume_writing()
            elif self.queue and self.queue[0].upstream is not None:
                up = self.queue[0].upstream.transport
                if not up.is_closing():
                    up.resume_reading()
        except Exception as exc:
            self.crashed("resume_writing", exc)

    # --- the parser's sink ----------------------------------------------------------------
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

    # --- serving a request: identify -> route -> connect -> exchange or tunnel ------------
    def _start(self, ex: Exchange) -> None:
        """Serve ``ex`` as far as it goes without waiting; the rest runs in a task."""
        ex.state = ROUTING
        rt = ex.runtime = self.gw.runtime
        r: Route | None = None
        try:
            identity = self._identify(rt, ex.head.proxy_authorization, ex.record)
            if isinstance(identity, Identity):
                r = self._route(ex, rt, identity)
                if r is None:
                    return  # answered by the gateway itself
                connector = self.gw.connector
                if cached_addresses(r, connector.resolver.cached, rt, self.gw.listeners.own):
                    self._judged(ex, r)
                    link = connector.idle(r, ex.connect)
                    if link is not None:
                        self._begin(ex, link)
                        return
        except GatewayError as err:
            self.exchange_failed(ex, err)
            return
        except Exception as exc:  # a bug: answer 500 and keep serving others
            self._internal_failure(ex, "serve", exc)
            return
        ex.task = self.gw.loop.create_task(self._serve(ex, identity, r))

    async def _serve(self, ex: Exchange, identity: Identity | PendingCheck, r: Route | None) -> None:
        try:
            rt = ex.runtime
            gw = self.gw
            if r is None:
                if isinstance(identity, PendingCheck):
                    identity = await self._check_password(rt, ex.head.proxy_authorization, identity, ex.record)
                r = self._route(ex, rt, identity)
                if r is None:
                    return
            if not r.ready:
                await resolve_and_judge(r, gw.connector.resolve, rt, gw.listeners.own)
                self._judged(ex, r)
            link = await gw.connector.connect(r, ex.connect, rt.timeouts.upstream_connect)
            self._begin(ex, link)
        except GatewayError as err:
            try:
                self.exchange_failed(ex, err)
            except Exception as exc:
                self.crashed("exchange_failed", exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: answer 500 and keep serving others
            self._internal_failure(ex, "serve", exc)

    def _identify(self, rt, auth: bytes | None, rec: AccessRecord) -> Identity | PendingCheck:
        """The client, known from an earlier request of this connection, or found now; a
        password not seen before needs a check off the loop (``PendingCheck``)."""
        key = self.identity_key
        if self.identity is not None and key[0] is rt and key[1] == auth:
            return self.identity
        result = rt.clients.identify(self.peer, auth, self.cert_subject)  # raises 407 / 403
        if isinstance(result, PendingCheck):
            return result
        return self._identified(rt, auth, result, rec)

    async def _check_password(self, rt, auth: bytes | None, pending: PendingCheck, rec: AccessRecord) -> Identity:
        ok = await self.gw.auth.check(self.peer, pending)
        result = rt.clients.identify(self.peer, auth, self.cert_subject) if ok else None
        if not isinstance(result, Identity):
            raise AuthRequired("wrong proxy credentials", reason="bad_credentials")
        return self._identified(rt, auth, result, rec)

    def _identified(self, rt, auth: bytes | None, identity: Identity, rec: AccessRecord) -> Identity:
        name = identity.client.name
        if self.counted != name:
            rec.client = name  # (a 429 below names who was refused)
            self.gw.limits.admit(identity.client)  # raises LimitReached (429)
            if self.counted is not None:
                self.gw.limits.release(self.counted)
            self.counted = name
        self.identity = identity
        self.identity_key = (rt, auth)
        self.client_name = name
        return identity

    def _route(self, ex: Exchange, rt, identity: Identity) -> Route | None:
        """``route.route`` for this request, its outcome noted on the record; None when the
        gateway answered it itself (``egressgate.whoami``)."""
        rec = ex.record
        rec.client = identity.client.name
        try:
            r = route(ex.head, ex.connect, identity, rt, self.listener.default_profile(rt), self.gw.listeners.own)
        except GatewayError as err:
            if err.profile is not None:
                rec.profile = err.profile
            raise
        if r.whoami:
            self._whoami(ex, rt, identity)
            return None
        rec.profile = r.pool.name
        ex.route = r
        ex.target = r.target
        if r.would_deny:
            self.gw.outcomes.would_deny(rec, identity.client.name, r.would_deny)
        return r

    def _judged(self, ex: Exchange, r: Route) -> None:
        if r.would_deny and ex.record.extra is None:  # (a rule on the resolved addresses)
            self.gw.outcomes.would_deny(ex.record, r.client.name, r.would_deny)

    def _whoami(self, ex: Exchange, rt, identity: Identity) -> None:
        """Answer ``egressgate.whoami`` (possibly from inside the parser's head callback: a
        request with no body to come is as good as complete)."""
        doc = whoami.document(identity, self.peer, rt, self.listener.default_profile(rt))
        keep = ex.head.keep_alive and self.may_keep_alive() and (ex.request_done or not ex.head.has_body)
        response = whoami.response(doc, keep)
        ex.record.profile = doc["profile"] or "-"
        ex.record.bytes_down = len(response)
        self.transport.write(response)
        ex.state = DONE
        if self.queue and self.queue[0] is ex:
            self.queue.pop(0)
        self._log(ex, 200)
        self._next(keep)

    def _begin(self, ex: Exchange, link: Link) -> None:
        up = link.upstream
        if self.closed:
            up.transport.close()
            return
        if ex.connect:
            self._open_tunnel(ex, link)
            return
        if up.key is not None:
            ex.pool_key = up.key
        ex.start(up, link.reused, link.chained, self.gw.loop.time())

    def _internal_failure(self, ex: Exchange, where: str, exc: BaseException) -> None:
        """A bug while serving one request: count it and answer 500; if even that fails, the
        connection is closed (``crashed``)."""
        self.gw.internal_error(where, exc)
        try:
            self.exchange_failed(ex, GatewayError(f"internal error: {type(exc).__name__}"))
        except Exception as again:
            self.crashed("exchange_failed", again)

    # --- tunnels --------------------------------------------------------------------------
    def _open_tunnel(self, ex: Exchange, link: Link) -> None:
        rec = ex.record
        up = link.upstream
        rec.status = 200
        rec.upstream_addr = up.remote
        rec.egress_addr = up.local
        self.transport.write(CONNECT_OK)
        t = Tunnel(self, up, rec, self.gw.loop.time(), self.listener.tls)
        self.tunnel = t
        self.early = None
        self.queue.clear()  # the tunnel keeps only its record: an idle tunnel stays small
        self.identity = None
        t.start(ex.body, link.leftover)
        if ex.body_bytes:
            self.flow.unbuffered(ex.body_bytes)
        ex.body = []
        ex.ended = True
        self.listener.tunnels.inc()
        if self.eof:
            t.client_eof()

    def tunnel_spliced(self) -> None:
        self.gw.metrics.spliced_tunnels.inc()

    def tunnel_ended(self, t: Tunnel, reason: str) -> None:
        self.closed = True
        self.listener.tunnels.dec()
        rec = t.record
        rec.bytes_up = t.bytes_up
        rec.bytes_down = t.bytes_down
        rec.reason = reason
        self.gw.outcomes.finished(rec, 200)

    # --- outcomes of exchanges (called by Exchange) ---------------------------------------
    def may_keep_alive(self) -> bool:
        return not self.gw.draining and not self.eof

    def body_pending(self, ex: Exchange) -> None:
        self.dirty.append(ex)

    def exchange_done(self, ex: Exchange) -> None:
        if self.queue and self.queue[0] is ex:
            self.queue.pop(0)
        up = ex.upstream
        if up is not None:
            if ex.upstream_keep and ex.request_done and ex.pool_key is not None and ex.response_started \
                    and not ex.up_out:
                self.gw.connector.release(up, ex.pool_key)
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
        self.gw.outcomes.refused(ex.record, err)
        if ex.upstream is not None:
            ex.upstream.detach()
            ex.upstream.transport.abort()  # failed: an origin that stopped reading must not hold it
        if self.closed:
            self._log(ex, err.status)
            return
        if ex.response_started:
            # Too late for an error response: the client sees the response cut short.
            self._log(ex, ex.record.status)
            self._close()
            return
        # (a request refused at its head, with no body to come, is as good as complete)
        keep = (err.status in (403, 407, 429) and (ex.request_done or not ex.head.has_body)
                and ex.head.keep_alive and not ex.body and self.may_keep_alive())
        self.transport.write(error_response(err, keep))
        self._log(ex, err.status)
        if ex is self.early:
            self.early = None
            if keep:  # e.g. a 407 to CONNECT: the client may retry on this connection
                limits = ex.runtime.limits
                self.parser = RequestParser(self, limits.max_head_bytes, limits.max_headers)
        self._next(keep)

    def retry_fresh(self, ex: Exchange) -> None:
        """A reused upstream failed before answering: the same route, on a new connection, once."""
        ex.state = ROUTING
        ex.reused = False
        ex.upstream = None
        ex.pool_key = None
        ex.record.upstream_addr = "-"
        ex.task = self.gw.loop.create_task(self._reconnect(ex))

    async def _reconnect(self, ex: Exchange) -> None:
        try:
            link = await self.gw.connector.connect(ex.route, False, ex.runtime.timeouts.upstream_connect, fresh=True)
            self._begin(ex, link)
        except GatewayError as err:
            try:
                self.exchange_failed(ex, err)
            except Exception as exc:
                self.crashed("exchange_failed", exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._internal_failure(ex, "serve", exc)

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

    # --- closing ----------------------------------------------------------------------------
    def eof_received(self) -> bool:
        self.eof = True
        try:
            if self.tunnel is not None:
                return self.tunnel.client_eof()
            if self.queue and self.queue[0].request_done:
                return True  # the request is complete; answer it, then close
        except Exception as exc:
            self.crashed("eof_received", exc)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._lost("client_closed" if exc is None else "client_reset")
        except Exception as bug:
            self.crashed("connection_lost", bug)

    def _lost(self, reason: str) -> None:
        if not self.closed and not self.queue and self.head_started is not None and self.tunnel is None:
            self._head_record(reason, 499)  # the client hung up part-way through a request head
        self.closed = True
        if self.tunnel is not None:
            self.tunnel.end(reason)
        queue, self.queue = self.queue, []
        for ex in queue:
            if ex.task is not None and not ex.task.done():
                ex.task.cancel()
            if ex.upstream is not None and ex.state is not DONE:
                ex.upstream.detach()
                ex.upstream.transport.abort()  # unfinished: nothing of it needs flushing
            if not ex.ended and ex.state is not NEW:  # it was being served
                ex.record.reason = ex.record.reason or reason
                self._log(ex, 499)
        self._forget()

    def _forget(self) -> None:
        if self.counted is not None:
            self.gw.limits.release(self.counted)
            self.counted = None
        if self in self.gw.connections:
            self.gw.connections.discard(self)
            self.listener.connections.dec()

    def _abort(self) -> None:
        self.closed = True
        self.transport.abort()

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

    def crashed(self, where: str, exc: BaseException) -> None:
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
            self._head_record(reason, 503)
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
            if rec.client == "-" and self.client_name:
                rec.client = self.client_name
            rec.reason = err.reason
            self.transport.write(error_response(err))
            self.gw.outcomes.finished(rec, err.status)
            if ex is not None:
                ex.ended = True
        for other in self.queue:
            if not other.ended and other.state is not NEW:
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
        self.linger = LINGER_BYTES
        self.gw.loop.call_later(LINGER_SECONDS, t.abort)
        self.flow.release()

    # --- records ------------------------------------------------------------------------------
    def _log(self, ex: Exchange, status: int) -> None:
        if ex.ended:
            return
        ex.ended = True
        self.gw.outcomes.finished(ex.record, status)

    def _head_record(self, reason: str, status: int) -> None:
        """The one record of a request whose head never completed."""
        started = time.time() - (self.gw.loop.time() - self.head_started)
        rec = AccessRecord(self.peer, self.listener.name, started, reason=reason)
        self.gw.outcomes.finished(rec, status)

    # --- timeouts (asked by the gateway's sweep) ----------------------------------------------
    def tick(self, now: float, rt) -> None:
        if self.closed:
            return
        t = self.tunnel
        if t is not None:
            if t.idle_for(now) > rt.timeouts.tunnel_idle:
                t.end("idle_timeout")
            return
        if self.queue:
            ex = self.queue[0]
            client_not_reading = bool(self.flow.paused & Pause.UPSTREAM or self.transport.get_write_buffer_size())
            err = ex.overdue(now, rt.timeouts.upstream_response, rt.timeouts.exchange_idle, client_not_reading)
            if err is not None:
                ex.fail(err)
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

    # --- the status snapshot ------------------------------------------------------------------
    def view(self, now: float) -> dict:
        """This connection as the admin status shows it (a copy: nothing here is live)."""
        t = self.tunnel
        rec = t.record if t is not None else (self.queue[0].record if self.queue else None)
        return {
            "client_addr": self.peer, "client": self.client_name or "-", "listener": self.listener.name,
            "state": "tunnel" if t is not None else ("request" if rec is not None else "idle"),
            "profile": rec.profile if rec is not None else "-",
            "target": rec.target[:200] if rec is not None else "-",
            "egress_addr": rec.egress_addr if rec is not None else "-",
            "bytes_up": t.bytes_up if t is not None else (rec.bytes_up if rec is not None else 0),
            "bytes_down": t.bytes_down if t is not None else (rec.bytes_down if rec is not None else 0),
            "age_seconds": round(time.time() - rec.start if rec is not None else now - self.since, 3),
        }
