"""Why reading from a client is paused. Each reason is set and cleared on its own; the client
is read from again only when no reason is left (see ``ClientConnection.pause_reading``)."""

from __future__ import annotations

import enum


class Pause(enum.IntFlag):
    BUFFERED = 1  # request bytes held before the upstream is ready, over BUFFER_LIMIT
    UPSTREAM = 2  # the upstream's write buffer is over its high-water mark
    BACKLOG = 4  # unparsed bytes wait: too many pipelined requests, or a turn yielded to others
    SPLICED = 8  # a bulk tunnel moved to splice(2); the pumps read from now on (never cleared)


SLICE = 8 * 1024  # bytes parsed per step of a large read
WORK_PER_TURN = 1024  # parser events (heads, body pieces) before yielding the loop to others
PIPELINE_LIMIT = 16  # requests queued on one connection before its reading stops
