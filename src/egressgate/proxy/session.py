"""``ClientConnection``: the asyncio protocol of one client connection.

It admits the peer (``gate``: source address, a load balancer's PROXY header, the connection
limit), then hands the bytes to the phase the connection is in:

- its listener protocol's phase (``phases.PHASES``, the interface ``serve.Phase``): on HTTP a
  ``RequestPipeline`` (``pipeline``) parses requests and serves them in order; on SOCKS5 a
  ``SocksHandshake`` (``socks``) negotiates;
- tunnel: after a successful CONNECT, a ``Tunnel`` (``tunnel``) owns the connection and the
  pipeline is dropped;
- lingering: after an error answer, what the client still sends is read and discarded,
  within a bound, so the answer is not lost to a reset.

It owns what outlives a phase: the transport, flow control (``flow.FlowControl``), who the
client is (``dispatch.Who``: its identity and the limit it counts against), closing, and its
place among the gateway's open connections.

Every callback catches what escapes it: a bug in one connection closes that connection
(``crashed``: counted, logged once, every transport closed), never leaks a descriptor and
never reaches the event loop.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Protocol

from ..http1.responses import CONNECT_OK
from ..model import shown_target
from . import gate
from .blocks import WatchedTunnel
from .connector import Link
from .dispatch import Who
from .flow import FlowControl
from .forward import Exchange
from .gate import Admission
from .listeners import ListenerInfo
from .phases import PHASES
from .serve import Phase, Services
from .tunnel import Tunnel

if TYPE_CHECKING:
    from .gate import Gate
    from .limits import ClientLimits

FLUSH_GRACE = 10.0  # seconds a closed connection may take to flush its last bytes, then it is reset
LINGER_SECONDS, LINGER_BYTES = 2.0, 1 << 20  # after an error answer, what we read and discard at most


class ConnectionServices(Services, Protocol):
    """What a connection may use of the gateway: its phases' ``Services`` and, for admitting
    and counting connections, these (``server.Gateway`` is one)."""

    connections: set  # the open connections (drain, status, the connection limit)
    gate: Gate  # refusals at accept, counted
    limits: ClientLimits  # a client's open-connection count, released when it goes


class ClientConnection(asyncio.Protocol):
    __slots__ = ("gw", "listener", "transport", "flow", "who", "http", "tunnel", "closed", "eof", "pp_buf",
                 "linger_left", "__weakref__")

    def __init__(self, gw: ConnectionServices, listener: ListenerInfo) -> None:
        self.gw = gw
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl | None = None
        self.who = Who("-")
        self.http: Phase | None = None  # the listener protocol's phase (None once a tunnel took over)
        self.tunnel: Tunnel | None = None
        self.closed = False
        self.eof = False
        self.pp_buf: bytes | None = None  # collecting a PROXY protocol header
        self.linger_left = 0  # bytes still discarded after an error answer (see linger)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.gw.loop

    # --- accept -----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow = FlowControl(transport)  # type: ignore[arg-type]
        try:
            self._admit(transport)
        except Exception as exc:
            self.crashed("connection_made", exc)

    def _admit(self, transport: asyncio.BaseTransport) -> None:
        gw = self.gw
        verdict, peer = gate.admit(transport.get_extra_info("peername"), self.listener.name, gw.runtime,
                                   len(gw.connections))
        self.who.peer = peer
        if verdict is not Admission.ADMIT and verdict is not Admission.READ_PROXY_HEADER:
            gw.gate.refused(verdict, peer)
            self.closed = True
            answer = PHASES[self.listener.protocol].AT_LIMIT if verdict is Admission.MAX_CONNECTIONS else None
            if answer is not None:
                transport.write(answer)
                transport.close()
            else:
                transport.abort()
            return
        if verdict is Admission.READ_PROXY_HEADER:
            self.pp_buf = b""
        gw.connections.add(self)
        self.listener.counts.connections += 1
        self.http = PHASES[self.listener.protocol](self, gw.loop.time())  # (until a tunnel takes over)
        if self.listener.tls:
            self.who.cert_subject = gate.subject_cn(transport.get_extra_info("peercert"))

    def _proxy_header(self, data: bytes) -> None:
        buf = self.pp_buf + data
        verdict, self.who.peer, consumed = gate.after_proxy_header(buf, self.who.peer, self.gw.runtime)
        if verdict is None:
            self.pp_buf = buf
            return
        self.pp_buf = None
        if verdict is not Admission.ADMIT:
            self.gw.gate.refused(verdict, self.who.peer)
            self._abort()
            return
        rest = buf[consumed:]
        if rest:
            self._received(rest)

    # --- asyncio callbacks --------------------------------------------------------------------
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
            self.linger_left -= len(data)
            if self.linger_left < 0:
                self.transport.abort()
        elif self.pp_buf is not None:
            self._proxy_header(data)
        else:
            self.http.received(data)

    def eof_received(self) -> bool:
        self.eof = True
        try:
            if self.tunnel is not None:
                return self.tunnel.client_eof()
            if self.http is not None and self.http.request_complete():
                return True  # the request is complete; answer it, then close
        except Exception as exc:
            self.crashed("eof_received", exc)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = "client_closed" if exc is None else "client_reset"
        try:
            if self.tunnel is not None:
                self.closed = True
                self.tunnel.end(reason)
            elif self.http is not None:
                self.http.lost(reason)
            self.closed = True
            self._forget()
        except Exception as bug:
            self.crashed("connection_lost", bug)

    def pause_writing(self) -> None:
        try:
            if self.tunnel is not None:
                self.tunnel.client_pause_writing()
            elif self.http is not None:
                self.http.pause_writing()
        except Exception as exc:
            self.crashed("pause_writing", exc)

    def resume_writing(self) -> None:
        try:
            if self.tunnel is not None:
                self.tunnel.client_resume_writing()
            elif self.http is not None:
                self.http.resume_writing()
        except Exception as exc:
            self.crashed("resume_writing", exc)

    # --- the tunnel phase (tunnel.ClientSide) -------------------------------------------------
    def open_tunnel(self, ex: Exchange, link: Link, reply: bytes = CONNECT_OK) -> None:
        rec = ex.record
        up = link.upstream
        rec.status = 200
        rec.upstream_addr = up.remote
        rec.egress_addr = up.local
        if rec.watch is None:
            self.transport.write(reply)
            t = Tunnel(self, up, rec, self.gw.loop.time(), self.listener.tls)
        else:  # a provider's destination: the reply tells the job its member's state; the tunnel looks
            self.transport.write(rec.watch.connect_reply(reply))
            t = WatchedTunnel(self, up, rec, self.gw.loop.time(), self.listener.tls)
        self.tunnel = t
        self.http = None  # the tunnel keeps only its record: an idle tunnel stays small
        self.who.forget()
        early = t.start(ex.hand_over(), link.leftover)
        if early:
            self.flow.unbuffered(early)
        self.listener.counts.tunnels += 1
        if self.flow.write_paused:  # the client is not reading yet
            t.client_pause_writing()
        if self.eof:
            t.client_eof()

    def tunnel_spliced(self) -> None:
        self.gw.metrics.spliced_tunnels.inc()

    def tunnel_ended(self, t: Tunnel, reason: str) -> None:
        self.closed = True
        self.listener.counts.tunnels -= 1
        rec = t.record
        rec.bytes_up = t.bytes_up
        rec.bytes_down = t.bytes_down
        rec.reason = reason
        self.gw.outcomes.finished(rec, 200)

    # --- closing ------------------------------------------------------------------------------
    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()
            if self.transport.get_write_buffer_size():
                # close() waits for the write buffer to drain; a client that never reads must
                # not hold the connection (and its descriptor) forever.
                self.gw.loop.call_later(FLUSH_GRACE, self.transport.abort)
        if self.http is not None:
            self.http.close_queue()

    def linger(self) -> None:
        """Half-close after an error answer and discard what the client still sends, for at
        most LINGER_SECONDS or LINGER_BYTES, then close (as web servers' lingering close)."""
        self.closed = True
        t = self.transport
        t.write_eof()
        self.linger_left = LINGER_BYTES
        self.gw.loop.call_later(LINGER_SECONDS, t.abort)
        self.flow.release()

    def _abort(self) -> None:
        self.closed = True
        self.transport.abort()

    def _forget(self) -> None:
        if self.who.counted is not None:
            self.gw.limits.release(self.who.counted)
            self.who.counted = None
        if self in self.gw.connections:
            self.gw.connections.discard(self)
            self.listener.counts.connections -= 1

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
        elif self.http is not None:
            self.http.teardown(reason, abort)
        self.closed = True
        if self.transport is not None:
            self.transport.abort() if abort else self.transport.close()
        self._forget()

    # --- the gateway's sweep and status -------------------------------------------------------
    def tick(self, now: float, rt) -> None:
        if self.closed:
            return
        if self.tunnel is not None:
            if self.tunnel.idle_for(now) > rt.timeouts.tunnel_idle:
                self.tunnel.end("idle_timeout")
        elif self.http is not None:
            self.http.tick(now, rt)

    def view(self, now: float) -> dict:
        """This connection as the admin status shows it (a copy: nothing here is live)."""
        t = self.tunnel
        rec = t.record if t is not None else (self.http.current() if self.http is not None else None)
        moved = (t.bytes_up, t.bytes_down) if t is not None else (
            (rec.bytes_up, rec.bytes_down) if rec is not None else (0, 0))
        who = self.who
        # the client as the access log names it: namespace/serviceaccount (and pod) for a token
        subject = who.identity.subject if who.identity is not None else None
        client = rec.client if rec is not None and rec.client != "-" else (
            who.identity.name if who.identity is not None else who.counted or "-")
        pod = (rec.extra or {}).get("pod") if rec is not None and rec.client != "-" else (
            subject.pod if subject is not None else None)
        return {
            "client_addr": who.peer, "client": client, "entry": who.counted, "pod": pod,
            "listener": self.listener.name,
            "state": "tunnel" if t is not None else ("request" if rec is not None else "idle"),
            "profile": rec.profile if rec is not None else "-",
            "target": shown_target(rec.target)[:200] if rec is not None else "-",
            "egress_addr": rec.egress_addr if rec is not None else "-",
            "egress_ip": rec.egress_ip if rec is not None else None,
            "bytes_up": moved[0], "bytes_down": moved[1],
            "age_seconds": round(time.time() - rec.start if rec is not None else
                                 now - (self.http.since if self.http is not None else now), 3),
        }
