"""Back-pressure on the client side of a connection.

Reading from a client is paused for independent, named reasons (``Pause``); each is set and
cleared on its own, and the client is read from again only when no reason is left. Request
bytes held before their upstream is ready are counted here too (``buffered``/``unbuffered``):
over ``BUFFER_LIMIT`` the client is paused, below half of it resumed.

``FlowControl`` is the only code that pauses or resumes a client transport's reading.
"""

from __future__ import annotations

import asyncio
from typing import Any


class Pause:
    """The reasons, as bits of one int (plain ints, not an ``enum.IntFlag``: every ``&`` of a
    flag builds a new enum member, a few thousand instructions per request on the hot path)."""

    BUFFERED = 1  # request bytes held before the upstream is ready, over BUFFER_LIMIT
    UPSTREAM = 2  # the upstream's write buffer is over its high-water mark
    BACKLOG = 4  # unparsed bytes wait: too many pipelined requests, or a turn yielded to others
    SPLICED = 8  # a bulk tunnel moved to splice(2); the pumps read from now on (never cleared)


NOT_PAUSED = 0
BUFFER_LIMIT = 256 * 1024  # request bytes held per connection before the client is paused
SLICE = 8 * 1024  # bytes parsed per step of a large read
WORK_PER_TURN = 1024  # parser events (heads, body pieces) before yielding the loop to others
PIPELINE_LIMIT = 16  # requests queued on one connection before its reading stops


class FlowControl:
    __slots__ = ("transport", "paused", "held", "stopped", "write_paused")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.paused = NOT_PAUSED
        self.held = 0  # request bytes buffered, all exchanges of the connection
        self.stopped = False  # the connection is closing: reading is no longer managed
        # The client's write buffer is over its high-water mark (asyncio said pause_writing and
        # has not said resume_writing yet): whatever feeds the client starts paused, including
        # the upstream of the next request or a tunnel opened meanwhile.
        self.write_paused = False

    def pause(self, reason: int) -> None:
        if not self.paused and not self.stopped and not self.transport.is_closing():
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and not self.stopped and not self.transport.is_closing():
            self.transport.resume_reading()

    def buffered(self, n: int) -> None:
        self.held += n
        if self.held > BUFFER_LIMIT:
            self.pause(Pause.BUFFERED)

    def unbuffered(self, n: int) -> None:
        self.held -= n
        if self.held <= BUFFER_LIMIT // 2:
            self.resume(Pause.BUFFERED)

    def stop(self) -> None:
        """The connection is closing: no reason pauses or resumes it any more."""
        self.stopped = True

    def release(self) -> None:
        """Forget every reason and read again (a lingering close discards what comes)."""
        self.stopped = True
        if self.paused:
            self.paused = NOT_PAUSED
            self.transport.resume_reading()


class OwnsUpstream:
    """The part of an upstream connection's owner that is the same for every owner (its
    ``conn`` has ``crashed`` and ``flow``): a bug in an upstream callback closes the client
    connection; the upstream's write buffer filling pauses reading from the client."""

    __slots__ = ()
    conn: Any

    def crashed(self, where: str, exc: BaseException) -> None:
        self.conn.crashed(where, exc)

    def upstream_pause_writing(self) -> None:
        self.conn.flow.pause(Pause.UPSTREAM)

    def upstream_resume_writing(self) -> None:
        self.conn.flow.resume(Pause.UPSTREAM)
