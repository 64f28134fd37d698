"""One absolute-URI request forwarded to an origin (or a chained proxy): the request head
rewritten and the body streamed up with its framing re-declared; the response parsed
(llhttp) and streamed down, re-framed for the client (length, chunked or close-delimited).

An ``Exchange`` is the owner of its ``Upstream`` while it runs and the sink of the response
parser. Bodies are never held whole: request bytes that arrive before the upstream is
connected are buffered up to a bound, after which the client is paused.

It sees its client connection only through ``ClientSide`` (a ``typing.Protocol``): the
transport to write the response to, flow control, and the outcome callbacks.

States (``State``): NEW (queued behind earlier requests) -> ROUTING (identify, route, dial)
-> SENDING (head sent, request body streaming) -> RESPONDING (response head received) ->
DONE (answered, failed or abandoned; nothing more happens).
"""

from __future__ import annotations

import asyncio
import enum
from typing import TYPE_CHECKING, Protocol

from ..egress.upstream import Upstream
from ..errors import ClientTimeout, GatewayError, UpstreamError, UpstreamTimeout
from ..http1.parse import RequestHead, ResponseHead, ResponseParser
from ..http1.rewrite import AbsoluteTarget, request_head_bytes, response_framing, response_head_bytes
from ..model import AccessRecord, UpstreamProxy
from .flow import FlowControl, OwnsUpstream, Pause

if TYPE_CHECKING:
    from .route import Route
    from .runtime import Runtime


class State(enum.Enum):
    NEW = "new"
    ROUTING = "routing"
    SENDING = "sending"
    RESPONDING = "responding"
    DONE = "done"


NEW, ROUTING, SENDING, RESPONDING, DONE = State  # (module globals: cheaper to read in the hot path)


class ClientSide(Protocol):
    """What an exchange needs of its client connection (and, as ``serve.OwnsUpstream``,
    ``crashed`` and ``flow``)."""

    transport: asyncio.Transport
    flow: FlowControl

    def may_keep_alive(self) -> bool: ...  # not draining, and the client has not half-closed
    def body_pending(self, ex: Exchange) -> None: ...  # ex has request bytes to flush after this read
    def exchange_done(self, ex: Exchange) -> None: ...
    def exchange_failed(self, ex: Exchange, err: GatewayError) -> None: ...
    def retry_fresh(self, ex: Exchange) -> None: ...
    def crashed(self, where: str, exc: BaseException) -> None: ...

_CRLF = b"\r\n"
_BACKOFF = frozenset({429, 503})
_LAST_CHUNK = b"0\r\n\r\n"


class Exchange(OwnsUpstream):
    __slots__ = ("conn", "head", "record", "body", "body_bytes", "request_done", "upstream", "parser",
                 "framing", "client_keep", "upstream_keep", "state", "sent_at", "reused", "target",
                 "runtime", "route", "task", "response_started", "pool_key", "connect", "ended", "out", "up_out",
                 "moved", "idle_since", "waiting")

    def __init__(self, conn: ClientSide, head: RequestHead, record: AccessRecord) -> None:
        self.conn = conn
        self.head = head
        self.record = record
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.request_done = False
        self.upstream: Upstream | None = None
        self.parser: ResponseParser | None = None
        self.framing = "none"
        self.client_keep = head.keep_alive
        self.upstream_keep = False
        self.state = NEW
        self.sent_at = 0.0
        self.reused = False
        self.target: AbsoluteTarget | None = None
        self.runtime: Runtime | None = None
        self.route: Route | None = None  # where it goes, once routed (a retry reuses it)
        self.task: asyncio.Task | None = None
        self.response_started = False
        self.pool_key: tuple | None = None
        self.connect = head.method == "CONNECT"
        self.ended = False
        self.out: list[bytes] = []  # response bytes produced by one upstream read, written at once
        self.up_out: list[bytes] = []  # request bytes produced by one client read, written at once
        self.moved = 0  # body bytes both ways when the sweeper last looked (idle timeout)
        self.idle_since = 0.0
        self.waiting = False  # in a protect rule's hold queue: a client that half-closes now is gone

    # state changes the pipeline asks for (the exchange owns its fields) ---------------------
    def retrying(self) -> None:
        """A reused upstream failed before answering: back to ROUTING, for a new connection."""
        self.state = ROUTING
        self.reused = False
        self.upstream = None
        self.pool_key = None
        self.record.upstream_addr = "-"

    def drop_upstream(self, abort: bool = True) -> None:
        """Let go of the upstream connection: reset (unfinished: nothing of it needs flushing)
        or, with ``abort=False``, closed after its buffer drains."""
        up = self.upstream
        if up is not None:
            up.detach()
            up.transport.abort() if abort else up.transport.close()

    def answered_here(self, profile: str, sent: int) -> None:
        """The gateway answered it itself (whoami, a job receipt) with ``sent`` bytes."""
        self.record.profile = profile
        self.record.bytes_down = sent
        self.state = DONE

    def cut(self, reason: str) -> None:
        """Ended before its answer was complete, for ``reason`` (its record is logged next)."""
        self.state = DONE
        self.record.reason = reason

    def hand_over(self) -> list[bytes]:
        """A CONNECT's tunnel takes over: the bytes the client sent after its head go to the
        tunnel (returned), and the exchange is over (the tunnel writes the record)."""
        body, self.body = self.body, []
        self.ended = True
        return body

    # request side (from the client's parser, via the session) ---------------------------
    def request_body(self, data: bytes) -> None:
        if self.state is SENDING or self.state is RESPONDING:
            if not self.up_out:
                self.conn.body_pending(self)
            if self.head.chunked:
                self.up_out += (b"%x\r\n" % len(data), data, _CRLF)
            else:
                self.up_out.append(data)
            self.record.bytes_up += len(data)
        else:
            self.body.append(data)
            self.body_bytes += len(data)
            self.conn.flow.buffered(len(data))

    def request_end(self) -> None:
        self.request_done = True
        if (self.state is SENDING or self.state is RESPONDING) and self.head.chunked:
            if not self.up_out:
                self.conn.body_pending(self)
            self.up_out.append(_LAST_CHUNK)

    def flush_up(self) -> None:
        """Write the request bytes one client read produced, in one call (1-byte chunks from
        a client cost one write per read, not one per chunk)."""
        out, self.up_out = self.up_out, []
        up = self.upstream
        if out and up is not None and self.state is not DONE and not up.transport.is_closing():
            up.transport.writelines(out)

    def _send_body(self, data: bytes) -> None:
        up = self.upstream.transport
        if self.head.chunked:
            up.writelines((b"%x\r\n" % len(data), data, _CRLF))
        else:
            up.write(data)
        self.record.bytes_up += len(data)

    def _send_end(self) -> None:
        if self.head.chunked:
            self.upstream.transport.write(_LAST_CHUNK)

    def start(self, upstream: Upstream, reused: bool, chained: UpstreamProxy | None, now: float) -> None:
        """The upstream is connected: send the head and whatever body is buffered. Through a
        chained proxy the target stays absolute and the proxy's own credentials are added."""
        self.upstream = upstream
        self.reused = reused
        upstream.attach(self)
        parser = upstream.parser
        if parser is not None and parser.reusable:
            parser.rebind(self, self.head.method)
        else:
            parser = upstream.parser = ResponseParser(self, self.head.method)
        self.parser = parser
        self.record.upstream_addr = upstream.remote
        self.record.egress_addr = upstream.local
        upstream.transport.write(request_head_bytes(self.head, self.target, self.runtime.forwarding,
                                                    chained.authorization if chained else None, chained is not None))
        self.state = SENDING
        self.sent_at = self.idle_since = now
        if self.body:
            body, self.body = self.body, []
            n = self.body_bytes
            self.body_bytes = 0
            for chunk in body:
                self._send_body(chunk)
            self.conn.flow.unbuffered(n)
        if self.request_done:
            self._send_end()

    # upstream events ---------------------------------------------------------------------
    def upstream_data(self, data: bytes) -> None:
        try:
            self.parser.feed(data)
        except GatewayError as err:
            self.flush()
            if self.state is DONE and self.upstream is not None:
                self.upstream.transport.close()  # it sent more than the response: never reuse it
            self.fail(err)
            return
        if self.out:
            self.flush()

    def flush(self) -> None:
        """Write what the last upstream read produced in one system call (head and body
        of a small response travel together)."""
        out = self.out
        if out:
            self.out = []
            self.conn.transport.writelines(out)

    def upstream_eof(self) -> bool:
        try:
            self.parser.feed_eof()
        except GatewayError as err:
            self.fail(err)
        return False

    def upstream_lost(self, exc: Exception | None) -> None:
        if self.state is not DONE:
            self.fail(UpstreamError("the origin closed the connection before the response was complete",
                                    reason="upstream_closed", proxy_status="http_response_incomplete"))

    # response sink (from the response parser) ------------------------------------------------
    def on_response_head(self, head: ResponseHead) -> None:
        if head.informational:
            if self.head.version == "1.1" and head.status != 101:
                self.out.append(response_head_bytes(head, self.runtime.forwarding.via, "none", True))
            return
        self.state = RESPONDING
        self.response_started = True
        self.framing = response_framing(head, self.head.version, self.head.method)
        self.client_keep = self.client_keep and self.framing != "close" and self.conn.may_keep_alive()
        self.upstream_keep = head.keep_alive
        self.record.status = head.status
        if head.status in _BACKOFF and self.record.protect is not None:  # shared-IP protection (proxy.protect)
            self.record.protect.answered(head.status, head.headers)
        self.out.append(response_head_bytes(head, self.runtime.forwarding.via, self.framing, self.client_keep))

    def on_response_body(self, data: bytes) -> None:
        if self.framing == "chunked":
            self.out += (b"%x\r\n" % len(data), data, _CRLF)
        else:
            self.out.append(data)
        self.record.bytes_down += len(data)

    def on_response_end(self) -> None:
        if self.framing == "chunked":
            self.out.append(_LAST_CHUNK)
        self.flush()
        self.state = DONE
        self.conn.exchange_done(self)

    # timeouts (asked by the connection's sweep) -----------------------------------------------
    def overdue(self, now: float, response_timeout: float, idle_limit: float,
                client_not_reading: bool) -> GatewayError | None:
        """The error to fail with if this exchange has waited too long, else None: no response
        head ``response_timeout`` after the whole request went up (504), or no body byte moved
        either way for ``idle_limit``: the client stopped sending its body (408), the origin
        stopped reading it (504), or a response stalled, the client not reading or the origin
        not sending (cut short)."""
        state = self.state
        if state is SENDING and self.request_done:
            if now - self.sent_at > response_timeout:
                return UpstreamError(f"no response from the origin within {response_timeout:g}s",
                                     reason="response_timeout", status=504, proxy_status="http_response_timeout")
            return None
        if state is not SENDING and state is not RESPONDING:
            return None
        moved = self.record.bytes_up + self.record.bytes_down
        if moved != self.moved:
            self.moved, self.idle_since = moved, now
            return None
        if now - self.idle_since <= idle_limit:
            return None
        if self.response_started:
            who = "the client did not read" if client_not_reading else "the origin sent nothing"
            return UpstreamTimeout(f"the response stalled for {idle_limit:g}s ({who})", reason="idle_timeout",
                                   proxy_status="http_response_timeout")
        if self.conn.flow.paused & Pause.UPSTREAM:
            return UpstreamTimeout(f"the origin did not read the request body for {idle_limit:g}s",
                                   reason="idle_timeout", proxy_status="http_request_error")
        return ClientTimeout(f"the request body stalled for {idle_limit:g}s", reason="client_timeout")

    # failure --------------------------------------------------------------------------------
    def fail(self, err: GatewayError) -> None:
        if self.state is DONE:
            return
        self.state = DONE
        up = self.upstream
        if up is not None:
            up.detach()
            up.transport.abort()  # failed: pending request bytes do not matter any more
        if self.reused and not self.response_started and not self.head.has_body and isinstance(err, UpstreamError) \
                and not isinstance(err, UpstreamTimeout):
            # A reused idle connection the origin had just closed: try once on a fresh one.
            self.conn.retry_fresh(self)
            return
        self.conn.exchange_failed(self, err)
