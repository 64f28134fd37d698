"""``RequestPipeline``: the HTTP part of one client connection — request heads parsed (llhttp),
each request an ``Exchange`` queued in arrival order (pipelining), the first one served.

Serving a request (``dispatch``) is synchronous as long as nothing must be awaited; the first
step that must wait hands the rest to a task. A CONNECT that gets its upstream hands the
connection to a ``Tunnel`` (``ClientSide.open_tunnel``) and the pipeline is dropped: an idle
tunnel keeps no parser, no queue.

A large read is parsed a slice at a time (``flow.SLICE``): reading stops while more than
``PIPELINE_LIMIT`` requests wait, and a turn that produced ``WORK_PER_TURN`` parser events
yields the loop to other connections (``Pause.BACKLOG``).
"""

from __future__ import annotations

import asyncio
import time

from ..errors import ClientTimeout, GatewayError, Unavailable
from ..http1.parse import RequestHead, RequestParser
from ..http1.responses import error_response
from ..model import AccessRecord
from . import whoami
from .connector import Link
from .dispatch import Whoami
from .flow import PIPELINE_LIMIT, SLICE, WORK_PER_TURN, Pause
from .forward import DONE, NEW, ROUTING, Exchange
from .serve import ClientSide, internal_failure, serve, serve_again


class RequestPipeline:
    """The phase of a connection on a ``protocol: http`` listener (``serve.Phase``)."""

    AT_LIMIT = error_response(Unavailable("the gateway is at its connection limit", reason="max_connections"))
    __slots__ = ("conn", "gw", "transport", "flow", "parser", "queue", "early", "backlog", "dirty", "work",
                 "head_started", "served", "since")

    def __init__(self, conn: ClientSide, now: float) -> None:
        self.conn = conn
        self.gw = conn.gw
        self.transport = conn.transport
        self.flow = conn.flow
        limits = conn.gw.runtime.limits
        self.parser: RequestParser | None = RequestParser(self, limits.max_head_bytes, limits.max_headers)
        self.queue: list[Exchange] = []  # a list, not a deque: 56 bytes idle instead of 760
        self.early: Exchange | None = None  # a CONNECT waiting for its tunnel: bytes go to its buffer
        self.backlog = b""  # bytes read but not parsed yet (Pause.BACKLOG)
        self.dirty: list[Exchange] = []  # exchanges with request bytes to write upstream after this read
        self.work = 0  # parser events in this turn (see _parse_in_steps)
        self.head_started: float | None = None
        self.served = 0
        self.since = now  # connected, or the last request answered (idle timeouts)

    # --- reading ----------------------------------------------------------------------------
    def received(self, data: bytes) -> None:
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
            self.protocol_error(err)
            return False
        if rest is not None and self.early is not None:
            if rest:
                self._early_data(rest)
            self._drop_parser()  # a tunnel follows; no more HTTP on this connection
            return False
        return not self.conn.closed

    def _parse_in_steps(self, data: bytes) -> None:
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
            if self.conn.closed or not self.flow.paused & Pause.BACKLOG or len(self.queue) > PIPELINE_LIMIT:
                return
            data, self.backlog = self.backlog, b""
            self.flow.resume(Pause.BACKLOG)
            if data:
                self.received(data)
        except Exception as exc:
            self.conn.crashed("data_received", exc)

    def _early_data(self, data: bytes) -> None:
        """Bytes after a CONNECT head, before its tunnel is up: kept for the tunnel."""
        ex = self.early
        ex.body.append(data)
        ex.body_bytes += len(data)
        self.flow.buffered(len(data))

    # --- the parser's sink ------------------------------------------------------------------
    def on_request_head(self, head: RequestHead) -> None:
        if self.conn.closed:  # answered with Connection: close: nothing after it is processed (RFC 9112 9.6)
            return
        self.work += 8
        rec = AccessRecord(self.conn.who.peer, self.conn.listener.name, time.time(), method=head.method,
                           target=head.target[:2048])
        ex = Exchange(self, head, rec)
        self.queue.append(ex)
        self.head_started = None
        if ex.connect:
            self.early = ex
        if len(self.queue) == 1:
            ex.state = ROUTING
            serve(self, ex)

    def on_request_body(self, data: bytes) -> None:
        self.work += 1
        if self.queue:  # (empty: the request was already answered, e.g. refused at its head)
            self.queue[-1].request_body(data)

    def on_request_end(self) -> None:
        if self.queue:  # (empty: as above; requests are answered in order, so none is skipped)
            self.queue[-1].request_end()

    # --- serving ------------------------------------------------------------------------------
    def ready(self, ex: Exchange, step: Link | Whoami) -> None:
        """``serve``'s answer: a connection for ``ex`` (forward it, or hand over to a tunnel), or
        the gateway's own answer (whoami, a job receipt)."""
        if isinstance(step, Whoami):
            if step.receipt is not None:  # the job's receipt: gathered from every worker, then signed
                ex.task = self.gw.loop.create_task(self._answer_receipt(ex, step))
                return
            self._answer_whoami(ex, step.doc)
            return
        up = step.upstream
        if self.conn.closed:
            up.transport.close()
            return
        try:
            ex.record.egress_ip = ex.route.pool.attested_ip(step.plan)
            if ex.connect:
                self.early = None
                self.queue.clear()  # (nothing else is queued behind a CONNECT; no cycle outlives the handover)
                self.conn.open_tunnel(ex, step)
                return
            if up.key is not None:
                ex.pool_key = up.key
            ex.start(up, step.reused, step.chained, self.gw.loop.time())
            if ex.record.watch is not None:  # a provider's destination: its answer is looked at
                ex.record.watch.forwarding(ex)
        except BaseException:
            if up.owner is None:  # a bug before the hand-over: the connection is nobody's, close it
                up.transport.abort()
            raise
        if self.flow.write_paused:  # the client is not reading: neither do we, from its origin
            up.transport.pause_reading()

    async def _answer_receipt(self, ex: Exchange, step: Whoami) -> None:
        try:
            doc = await self.gw.dispatcher.receipts.issue(step.receipt)
            if not self.conn.closed:
                self._answer_whoami(ex, doc, receipt=True)
        except GatewayError as err:
            self.exchange_failed(ex, err)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: answer 500 and keep serving others
            internal_failure(self, ex, "serve", exc)

    def _answer_whoami(self, ex: Exchange, doc: dict, receipt: bool = False) -> None:
        """The gateway's own answer (possibly from inside the parser's head callback: a
        request with no body to come is as good as complete)."""
        keep = ex.head.keep_alive and self.may_keep_alive() and (ex.request_done or not ex.head.has_body)
        response = whoami.receipt_response(doc, keep) if receipt else whoami.response(doc, keep)
        ex.answered_here(doc.get("profile") or "-", len(response))
        self.transport.write(response)
        if self.queue and self.queue[0] is ex:
            self.queue.pop(0)
        self._log(ex, 200)
        self._next(keep)

    # --- what an Exchange needs (forward.ClientSide) ------------------------------------------
    def may_keep_alive(self) -> bool:
        return not self.gw.draining and not self.conn.eof

    def body_pending(self, ex: Exchange) -> None:
        self.dirty.append(ex)

    def crashed(self, where: str, exc: BaseException) -> None:
        self.conn.crashed(where, exc)

    def retry_fresh(self, ex: Exchange) -> None:
        """A reused upstream failed before answering: the same route, on a new connection, once."""
        ex.retrying()
        serve_again(self, ex)

    def exchange_done(self, ex: Exchange) -> None:
        if self.queue and self.queue[0] is ex:
            self.queue.pop(0)
        self.flow.resume(Pause.UPSTREAM)  # (its upstream no longer takes the client's bytes)
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
        self.flow.resume(Pause.UPSTREAM)
        self.gw.outcomes.refused(ex.record, err)
        ex.drop_upstream()  # failed: an origin that stopped reading must not hold it
        if self.conn.closed:
            self._log(ex, err.status)
            return
        if ex.response_started:
            # Too late for an error response: the client sees the response cut short.
            self._log(ex, ex.record.status)
            self.conn.close()
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

    failed = exchange_failed  # (serve.Serving)

    def _next(self, keep: bool) -> None:
        if not keep or self.conn.closed:
            self.conn.close()
            return
        self.served += 1
        self.since = self.gw.loop.time()
        if self.backlog and len(self.queue) <= PIPELINE_LIMIT:
            self.gw.loop.call_soon(self._resume_backlog)
        if self.queue:
            ex = self.queue[0]
            ex.state = ROUTING
            serve(self, ex)
        elif self.conn.eof:
            self.conn.close()

    # --- back-pressure from the client's writing ------------------------------------------------
    def pause_writing(self) -> None:
        self.flow.write_paused = True
        if self.queue and self.queue[0].upstream is not None:
            self.queue[0].upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.flow.write_paused = False
        if self.queue and self.queue[0].upstream is not None:
            up = self.queue[0].upstream.transport
            if not up.is_closing():
                up.resume_reading()

    def request_complete(self) -> bool:
        """The client half-closed: is the request being served complete (answer, then close)?
        Not a CONNECT still dialing: a client that closes before its tunnel is up is gone (its
        dial is cancelled, 499), so a hostile client cannot leave dials running behind it. Nor a
        request waiting in a hold queue (``protect[].queue``): its place goes to the next."""
        return bool(self.queue) and self.queue[0].request_done and not self.queue[0].waiting

    # --- ending -------------------------------------------------------------------------------------
    def protocol_error(self, err: GatewayError) -> None:
        """The client's bytes are not acceptable HTTP: answer if no response has begun, then
        close (lingering, so the answer is not lost to a reset while the client still sends).
        Every request of the connection that was being served gets its record."""
        ex = self.queue[-1] if self.queue else None
        answer = ex is None or (not ex.response_started and len(self.queue) == 1)
        if answer:
            if ex is not None:
                if ex.task is not None:
                    ex.task.cancel()
                ex.drop_upstream()
                ex.state = DONE
            rec = ex.record if ex else AccessRecord(self.conn.who.peer, self.conn.listener.name, time.time())
            if rec.client == "-" and self.conn.who.counted:
                rec.client = self.conn.who.counted
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
            self.close_queue()
            self._drop_parser()
            self.early = None
            self.backlog = b""
            self.conn.linger()
        else:
            self.conn.close()

    def close_queue(self) -> None:
        for ex in self.queue:
            ex.drop_upstream()
        self.queue.clear()

    def _drop_parser(self) -> None:
        if self.parser is not None:
            self.parser.close()
            self.parser = None

    def lost(self, reason: str) -> None:
        """The client went away: cancel what is being served, abort its upstream connections,
        and give each request that was being served (and a head cut short) its 499 record."""
        self._drop_parser()
        if not self.queue and self.head_started is not None and not self.conn.closed:
            self._head_record(reason, 499)
        queue, self.queue = self.queue, []
        for ex in queue:
            if ex.task is not None and not ex.task.done():
                ex.task.cancel()
            if ex.state is not DONE:
                ex.drop_upstream()  # unfinished: nothing of it needs flushing
            if not ex.ended and ex.state is not NEW:  # it was being served
                ex.cut(ex.record.reason or reason)
                self._log(ex, 499)

    def teardown(self, reason: str, abort: bool) -> None:
        """Close everything now (a bug, or drain's deadline): each request not yet answered,
        queued ones included, gets its record with ``reason`` (503 if no response began)."""
        if not self.queue and self.head_started is not None and not self.conn.closed:
            self._head_record(reason, 503)
        queue, self.queue = self.queue, []
        for ex in queue:
            if ex.task is not None and not ex.task.done():
                ex.task.cancel()
            ex.drop_upstream(abort)
            if not ex.ended:
                ex.cut(reason)
                self._log(ex, ex.record.status if ex.response_started else 503)
        self.early = None

    def _head_record(self, reason: str, status: int) -> None:
        """The one record of a request whose head never completed."""
        started = time.time() - (self.gw.loop.time() - self.head_started)
        self.gw.outcomes.finished(AccessRecord(self.conn.who.peer, self.conn.listener.name, started,
                                               reason=reason), status)

    def _log(self, ex: Exchange, status: int) -> None:
        if ex.ended:
            return
        ex.ended = True
        self.gw.outcomes.finished(ex.record, status)

    # --- timeouts (asked by the connection's tick) ----------------------------------------------
    def tick(self, now: float, rt) -> None:
        if self.queue:
            ex = self.queue[0]
            client_not_reading = bool(self.flow.paused & Pause.UPSTREAM or self.transport.get_write_buffer_size())
            err = ex.overdue(now, rt.timeouts.upstream_response, rt.timeouts.exchange_idle, client_not_reading)
            if err is not None:
                ex.fail(err)
            return
        if self.gw.draining and self.head_started is None:
            self.conn.close()
            return
        if self.head_started is not None:
            if now - self.head_started > rt.timeouts.client_head:
                self.protocol_error(ClientTimeout(
                    f"the request head was not complete within {rt.timeouts.client_head:g}s"))
        elif self.served == 0:
            if now - self.since > rt.timeouts.client_head:
                self.protocol_error(ClientTimeout(f"no request within {rt.timeouts.client_head:g}s"))
        elif now - self.since > rt.timeouts.client_idle:
            self.conn.close()

    def current(self) -> AccessRecord | None:
        """The record of the request being served, if any (the status snapshot)."""
        return self.queue[0].record if self.queue else None
