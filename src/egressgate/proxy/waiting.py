"""The hold queue (``protect[].queue``): requests and tunnels over a shared-IP budget wait for
their turn instead of an immediate 429.

One ``Line`` per (profile, member, rule) while anyone waits there. Each client has its own
first-in-first-out row in it, and the rows take turns in the order their clients first
joined (round robin), so requests arriving one after another go in arrival order and one
client's burst cannot push another client's request behind all of it.

Only the head of a line tries to be admitted. It is woken when a slot of its key is released
(``poke``: ``proxy.protect`` calls it) or when the wait its last refusal named has passed (a
rate refilling, a hold ending, a slot freed by another worker or instance). While anyone
waits for a key, new arrivals join the line rather than take a freed slot first.

A waiter leaves when it is admitted, when its wait runs out (the caller answers 429 with
Retry-After), or when its client goes away: the serving task is cancelled, and ``leave``
runs in the caller's ``finally``. Leaving as head hands the turn to the next row's first.

Bounded: a line holds at most the rule's ``max_queued``; lines exist only while someone
waits; counters are keyed by configured names (profile, member, rule) and fixed outcomes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from ..observe.metrics import QUEUE_WAIT_BUCKETS

Key = tuple[str, str, str]  # (profile, member label, rule name), as in proxy.protect
OUTCOMES = ("admitted_after_wait", "timed_out", "client_gone", "queue_full")


class Waiter:
    __slots__ = ("client", "since", "wake")

    def __init__(self, client: str, since: float) -> None:
        self.client = client
        self.since = since
        self.wake: asyncio.Future | None = None  # what it awaits now: its turn, or a chance to retry


class Line:
    __slots__ = ("rows", "head", "size")

    def __init__(self) -> None:
        self.rows: dict[str, deque[Waiter]] = {}  # client -> its waiters, rows in turn order
        self.head: Waiter | None = None
        self.size = 0

    def next_head(self, previous: str) -> Waiter | None:
        """The first waiter of the row whose turn it is; that row goes to the back, as does the
        row of ``previous``, the client whose waiter just had the turn."""
        row = self.rows.pop(previous, None)
        if row is not None:
            self.rows[previous] = row
        for client, row in self.rows.items():
            waiter = row.popleft()
            del self.rows[client]
            if row:
                self.rows[client] = row
            return waiter
        return None


class Waitlines:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.lines: dict[Key, Line] = {}
        self.outcomes: dict[tuple[str, str, str, str], int] = {}  # key + outcome
        self.waited: dict[tuple[str, str], list] = {}  # (profile, rule) -> [bucket counts..., sum, count]

    def join(self, key: Key, client: str, max_queued: int) -> Waiter | None:
        """A new waiter at the back of its client's row, or None when the line is full."""
        line = self.lines.get(key)
        if line is None:
            line = self.lines[key] = Line()
        elif line.size >= max_queued:
            self.count(key, "queue_full")
            return None
        waiter = Waiter(client, self._clock())
        line.size += 1
        if line.head is None:
            line.head = waiter
        else:
            line.rows.setdefault(client, deque()).append(waiter)
        return waiter

    async def turn(self, key: Key, waiter: Waiter, seconds: float) -> bool:
        """Wait until ``waiter`` heads its line: True, or False when ``seconds`` pass first."""
        line = self.lines[key]
        if line.head is waiter:
            return True
        return await self._wait(waiter, seconds) and line.head is waiter

    async def pause(self, waiter: Waiter, seconds: float) -> None:
        """The head was refused again: wait for a release (``poke``) or ``seconds``."""
        await self._wait(waiter, seconds)

    def poke(self, key: Key) -> None:
        """A slot of ``key`` was released: its line's head tries again now."""
        line = self.lines.get(key)
        if line is not None and line.head is not None:
            _settle(line.head.wake, True)

    def leave(self, key: Key, waiter: Waiter, outcome: str) -> None:
        """``waiter`` is done: admitted (then ``admitted_after_wait``), out of time, or its
        client gone. As head, it hands the turn on."""
        line = self.lines.get(key)
        if line is None:
            return
        if line.head is waiter:
            line.head = line.next_head(waiter.client)
            if line.head is not None:
                _settle(line.head.wake, True)
        else:
            row = line.rows.get(waiter.client)
            if row is not None:
                try:
                    row.remove(waiter)
                except ValueError:
                    pass
                if not row:
                    del line.rows[waiter.client]
        line.size -= 1
        if line.size <= 0:
            del self.lines[key]
        self.count(key, outcome)
        self._observe(key, self._clock() - waiter.since)

    def count(self, key: Key, outcome: str) -> None:
        okey = (*key, outcome)
        self.outcomes[okey] = self.outcomes.get(okey, 0) + 1

    def _observe(self, key: Key, seconds: float) -> None:
        hkey = (key[0], key[2])
        h = self.waited.get(hkey)
        if h is None:
            h = self.waited[hkey] = [0] * len(QUEUE_WAIT_BUCKETS) + [0.0, 0]
        for i, bound in enumerate(QUEUE_WAIT_BUCKETS):
            if seconds <= bound:
                h[i] += 1
        h[-2] += seconds
        h[-1] += 1

    def queued(self) -> dict[Key, int]:
        return {key: line.size for key, line in self.lines.items()}

    async def _wait(self, waiter: Waiter, seconds: float) -> bool:
        fut = waiter.wake = asyncio.get_running_loop().create_future()
        handle = fut.get_loop().call_later(max(0.0, seconds), _settle, fut, False)
        try:
            return await fut
        finally:
            handle.cancel()
            waiter.wake = None


def _settle(fut: asyncio.Future | None, value: bool) -> None:
    if fut is not None and not fut.done():
        fut.set_result(value)
