"""One absolute-URI request forwarded to an origin (or a chained proxy): the request head
rewritten and the body streamed up with its framing re-declared; the response parsed
(llhttp) and streamed down, re-framed for the client (length, chunked or close-delimited).

An ``Exchange`` is the owner of its ``Upstream`` while it runs and the sink of the response
parser. Bodies are never held whole: request bytes that arrive before the upstream is
connected are buffered up to a bound, after which the client is paused.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..errors import GatewayError, UpstreamError, UpstreamTimeout
from ..http1.parse import RequestHead, ResponseHead, ResponseParser
from ..http1.rewrite import AbsoluteTarget, request_head_bytes, response_framing, response_head_bytes
from ..model import AccessRecord, UpstreamProxy
from .flow import Pause
from .upstream import Upstream

if TYPE_CHECKING:
    from .runtime import Runtime
    from .session import ClientConnection

NEW, DIALING, SENDING, RESPONDING, DONE = range(5)
VIA = b"1.1 egressgate"
_CRLF = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class Exchange:
    __slots__ = ("conn", "head", "record", "body", "body_bytes", "request_done", "upstream", "parser",
                 "framing", "client_keep", "upstream_keep", "state", "sent_at", "reused", "target",
                 "runtime", "task", "response_started", "pool_key", "connect", "ended", "out", "up_out",
                 "moved", "idle_since")

    def __init__(self, conn: ClientConnection, head: RequestHead, record: AccessRecord) -> None:
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
        self.task: asyncio.Task | None = None
        self.response_started = False
        self.pool_key: tuple | None = None
        self.connect = head.method == "CONNECT"
        self.ended = False
        self.out: list[bytes] = []  # response bytes produced by one upstream read, written at once
        self.up_out: list[bytes] = []  # request bytes produced by one client read, written at once
        self.moved = 0  # body bytes both ways when the sweeper last looked (idle timeout)
        self.idle_since = 0.0

    # request side (from the client's parser, via the session) ---------------------------
    def request_body(self, data: bytes) -> None:
        if self.state == SENDING or self.state == RESPONDING:
            if not self.up_out:
                self.conn.dirty.append(self)
            if self.head.chunked:
                self.up_out += (b"%x\r\n" % len(data), data, _CRLF)
            else:
                self.up_out.append(data)
            self.record.bytes_up += len(data)
        else:
            self.body.append(data)
            self.body_bytes += len(data)
            self.conn.buffered(len(data))

    def request_end(self) -> None:
        self.request_done = True
        if self.state == SENDING or self.state == RESPONDING:
            if self.head.chunked:
                if not self.up_out:
                    self.conn.dirty.append(self)
                self.up_out.append(_LAST_CHUNK)
            self.conn.request_sent(self)

    def flush_up(self) -> None:
        """Write the request bytes one client read produced, in one call (1-byte chunks from
        a client cost one write per read, not one per chunk)."""
        out, self.up_out = self.up_out, []
        up = self.upstream
        if out and up is not None and self.state != DONE and not up.transport.is_closing():
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
        upstream.transport.write(request_head_bytes(self.head, self.target, VIA,
                                                    chained.authorization if chained else None, chained is not None))
        self.state = SENDING
        self.sent_at = self.idle_since = now
        if self.body:
            body, self.body = self.body, []
            n = self.body_bytes
            self.body_bytes = 0
            for chunk in body:
                self._send_body(chunk)
            self.conn.unbuffered(n)
        if self.request_done:
            self._send_end()

    # upstream events ---------------------------------------------------------------------
    def upstream_data(self, data: bytes) -> None:
        try:
            self.parser.feed(data)
        except GatewayError as err:
            self.flush()
            if self.state == DONE and self.upstream is not None:
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
        if self.state != DONE:
            self.fail(UpstreamError("the origin closed the connection before the response was complete",
                                    reason="upstream_closed", proxy_status="http_response_incomplete"))

    def crashed(self, where: str, exc: BaseException) -> None:
        self.conn._crashed(where, exc)

    def upstream_pause_writing(self) -> None:
        self.conn.pause_reading(Pause.UPSTREAM)

    def upstream_resume_writing(self) -> None:
        self.conn.resume_reading(Pause.UPSTREAM)

    # response sink (from the response parser) ------------------------------------------------
    def on_response_head(self, head: ResponseHead) -> None:
        if head.informational:
            if self.head.version == "1.1" and head.status != 101:
                self.out.append(response_head_bytes(head, VIA, "none", True))
            return
        self.state = RESPONDING
        self.response_started = True
        self.framing = response_framing(head, self.head.version, self.head.method)
        self.client_keep = (self.client_keep and self.framing != "close" and not self.conn.gw.draining
                            and not self.conn.eof)
        self.upstream_keep = head.keep_alive
        self.record.status = head.status
        self.out.append(response_head_bytes(head, VIA, self.framing, self.client_keep))

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

    # failure --------------------------------------------------------------------------------
    def fail(self, err: GatewayError) -> None:
        if self.state == DONE:
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
