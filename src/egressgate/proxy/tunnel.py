"""A CONNECT tunnel: bytes both ways with back-pressure and correct half-close.

Client bytes are written to the upstream transport straight from the client protocol's
``data_received`` (see ``session``); upstream bytes come here. One side's EOF shuts down the
other side's write half (``write_eof``); the tunnel ends when both directions are done, when
either side is lost, or when the sweeper finds it idle too long.

A tunnel that carries bulk data (a single read of ``BULK`` bytes or more) switches to
zero-copy ``splice`` (see ``splice``); idle and chatty tunnels stay in copy mode, which holds
no extra descriptors.

A tunnel sees its client connection only through ``ClientSide`` (a ``typing.Protocol``).
Each direction is open until its EOF (``up_done``: client -> upstream, ``down_done``:
upstream -> client); ``ended`` once both are done or the tunnel is cut.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from ..egress.upstream import Upstream
from ..model import AccessRecord
from . import splice
from .flow import FlowControl, OwnsUpstream, Pause

BULK = 64 * 1024
FLUSH_GRACE = 10.0  # seconds a closing side may take to flush its last bytes, then it is reset


class ClientSide(Protocol):
    """What a tunnel needs of its client connection."""

    transport: asyncio.Transport
    flow: FlowControl

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    def tunnel_spliced(self) -> None: ...  # counted
    def tunnel_ended(self, t: Tunnel, reason: str) -> None: ...
    def crashed(self, where: str, exc: BaseException) -> None: ...


class Tunnel(OwnsUpstream):
    __slots__ = ("conn", "client", "upstream", "up", "record", "bytes_up", "bytes_down", "active", "idle_since",
                 "up_done", "down_done", "ended", "pumps", "socks", "copy_only")

    def __init__(self, conn: ClientSide, upstream: Upstream, record: AccessRecord, now: float,
                 copy_only: bool) -> None:
        self.conn = conn
        self.record = record
        self.client: asyncio.Transport = conn.transport
        self.upstream = upstream
        self.up: asyncio.Transport = upstream.transport
        self.bytes_up = 0
        self.bytes_down = 0
        self.active = False
        self.idle_since = now
        self.up_done = False  # client -> upstream direction finished
        self.down_done = False  # upstream -> client direction finished
        self.ended = False
        self.pumps: tuple[splice.Pump, splice.Pump] | None = None
        self.socks: tuple = ()
        self.copy_only = copy_only or not splice.AVAILABLE  # (TLS to the client: no splice)
        upstream.attach(self)

    def start(self, early: list[bytes], leftover: bytes) -> int:
        """Deliver what arrived before the tunnel was up: the chained proxy's bytes after its
        reply (``leftover``) to the client, the client's bytes after its CONNECT head
        (``early``) upstream. Returns the number of early bytes."""
        if leftover:
            self.upstream_data(leftover)
        n = 0
        for chunk in early:
            self.up.write(chunk)
            n += len(chunk)
        self.bytes_up += n
        gone = self.upstream.early_end  # the server left before the tunnel took its connection
        if gone is not None and not self.ended:
            eof, exc = gone
            if not eof:
                self.upstream_lost(exc)
            elif not self.upstream_eof():
                self.up.close()
        return n

    def client_data(self, data: bytes) -> None:
        self.up.write(data)
        self.bytes_up += len(data)
        self.active = True
        if len(data) >= BULK and not self.copy_only:
            self.go_bulk()

    def idle_for(self, now: float) -> float:
        """Seconds without a byte either way (asked by the connection's sweep)."""
        if self.active:
            self.active = False
            self.idle_since = now
        return now - self.idle_since

    # upstream events --------------------------------------------------------------------
    def upstream_data(self, data: bytes) -> None:
        self.client.write(data)
        self.bytes_down += len(data)
        self.active = True
        if len(data) >= BULK and not self.copy_only:
            self.go_bulk()

    def go_bulk(self) -> None:
        """Switch both directions to splice, once both write buffers are empty."""
        if self.pumps is not None or self.ended or self.up_done or self.down_done:
            return
        if self.client.get_write_buffer_size() or self.up.get_write_buffer_size():
            return  # not yet: the next large read tries again
        csock = splice.duplicate(self.client)
        usock = splice.duplicate(self.up) if csock is not None else None
        if usock is None:
            if csock is not None:
                csock.close()
            self.copy_only = True
            return
        self.up.pause_reading()
        self.conn.flow.pause(Pause.SPLICED)  # never resumed: the pumps read from now on
        loop = self.conn.loop
        self.socks = (csock, usock)
        self.pumps = (splice.Pump(loop, csock, usock, self._count_up, self._up_eof, self._error, self._pump_crashed),
                      splice.Pump(loop, usock, csock, self._count_down, self._down_eof, self._error,
                                  self._pump_crashed))
        for pump in self.pumps:
            pump.start()
        self.conn.tunnel_spliced()

    def _count_up(self, n: int) -> None:
        self.bytes_up += n
        self.active = True

    def _count_down(self, n: int) -> None:
        self.bytes_down += n
        self.active = True

    def _up_eof(self) -> None:
        self.up_done = True
        if self.down_done:
            self.end("")

    def _down_eof(self) -> None:
        self.down_done = True
        if self.up_done:
            self.end("")

    def _error(self, what: str) -> None:
        self.end("reset")

    def _pump_crashed(self, exc: BaseException) -> None:
        self.conn.crashed("splice", exc)

    def upstream_eof(self) -> bool:
        self.down_done = True
        if self.up_done:
            self.end("")
            return False
        if self.client.can_write_eof():
            self.client.write_eof()
            return True
        self.end("")  # TLS to the client has no half-close: close after flushing
        return False

    def upstream_lost(self, exc: Exception | None) -> None:
        self.end("upstream_reset" if exc else "")

    # client events (called by the session) ------------------------------------------------
    def client_eof(self) -> bool:
        self.up_done = True
        if self.down_done:
            self.end("")
            return False
        if self.up.can_write_eof():
            self.up.write_eof()
        return True

    def client_pause_writing(self) -> None:
        self.up.pause_reading()

    def client_resume_writing(self) -> None:
        if not self.up.is_closing():
            self.up.resume_reading()

    def end(self, reason: str) -> None:
        """Close both sides (pending writes are flushed first) and report once."""
        if self.ended:
            return
        self.ended = True
        if self.pumps is not None:
            for pump in self.pumps:
                pump.close()
            for sock in self.socks:
                sock.close()
            self.pumps = None
        self.upstream.detach()
        if reason in ("", "client_closed"):  # a clean end: flush what is in flight
            self.up.close()
            self.client.close()
            for side in (self.up, self.client):
                if side.get_write_buffer_size():  # ... but a side that never reads cannot hold it
                    self.conn.loop.call_later(FLUSH_GRACE, side.abort)
        else:  # reset, timeout, drain, bug: nothing more will be delivered
            self.up.abort()
            self.client.abort()
        self.conn.tunnel_ended(self, reason)
