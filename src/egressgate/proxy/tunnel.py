"""A CONNECT tunnel: bytes both ways with back-pressure and correct half-close.

Client bytes are written to the upstream transport straight from the client protocol's
``data_received`` (see ``session``); upstream bytes come here. One side's EOF shuts down the
other side's write half (``write_eof``); the tunnel ends when both directions are done, when
either side is lost, or when the sweeper finds it idle too long.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..model import AccessRecord
from .upstream import Upstream

if TYPE_CHECKING:
    from .session import ClientConnection


class Tunnel:
    __slots__ = ("conn", "client", "upstream", "up", "record", "bytes_up", "bytes_down", "active", "idle_since",
                 "up_done", "down_done", "ended")

    def __init__(self, conn: ClientConnection, upstream: Upstream, record: AccessRecord, now: float) -> None:
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
        upstream.attach(self)

    # upstream events --------------------------------------------------------------------
    def upstream_data(self, data: bytes) -> None:
        self.client.write(data)
        self.bytes_down += len(data)
        self.active = True

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

    def upstream_pause_writing(self) -> None:
        self.conn.pause_reading(2)

    def upstream_resume_writing(self) -> None:
        self.conn.resume_reading(2)

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
        self.upstream.detach()
        self.up.close()
        self.client.close()
        self.conn.tunnel_ended(self, reason)
