"""Per-client limits and the password-check throttle: the state about clients that all of a
worker's connections share.

- ``ClientLimits``: concurrent connections per client (``max_connections``) and new
  connections per second (``max_new_per_second``, a token bucket); over either, ``admit``
  raises ``LimitReached`` (429). A connection counts against one client at a time.
- ``AuthThrottle``: slow password checks (scrypt) run off the event loop; many connections
  presenting the same new credentials share one check; an address that keeps failing waits
  longer before each further check.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

from ..errors import LimitReached
from ..policy.clients import ClientPolicy, PendingCheck

FAILURES_BEFORE_DELAY = 5
FAILURE_DELAY_STEP, FAILURE_DELAY_MAX = 0.2, 3.0  # seconds added per failure past the fourth, at most
FAILURE_MEMORY = 60.0  # seconds after which an address's failures are forgotten
MAX_TRACKED_ADDRESSES = 10_000


class ClientLimits:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.per_client: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}

    def admit(self, client: ClientPolicy) -> None:
        """Count a connection against ``client``, or refuse it (429)."""
        name = client.name
        n = self.per_client.get(name, 0)
        if client.max_connections is not None and n >= client.max_connections:
            raise LimitReached(f"client {name} is at its limit of {client.max_connections} concurrent connections",
                               headers=(("Retry-After", "1"),))
        rate = client.max_new_per_second
        if rate is not None:
            now = self._clock()
            burst = max(1.0, rate)  # a rate below 1/s still admits one connection per 1/rate seconds
            tokens, last = self._buckets.get(name, (burst, now))
            tokens = min(burst, tokens + (now - last) * rate)
            if tokens < 1.0:
                self._buckets[name] = (tokens, now)
                wait = math.ceil((1.0 - tokens) / rate)  # seconds until the next token
                raise LimitReached(f"client {name} is over {rate:g} new connections per second",
                                   reason="rate_limited", headers=(("Retry-After", str(max(1, wait))),))
            self._buckets[name] = (tokens - 1.0, now)
        self.per_client[name] = n + 1

    def release(self, name: str) -> None:
        n = self.per_client.get(name, 0) - 1
        if n > 0:
            self.per_client[name] = n
        else:
            self.per_client.pop(name, None)


class AuthThrottle:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._failures: dict[str, tuple[int, float]] = {}
        self._checks: dict[bytes, asyncio.Future[bool]] = {}

    async def check(self, peer: str, pending: PendingCheck) -> bool:
        """Run a slow password check off the loop; addresses that keep failing wait longer."""
        count, since = self._failures.get(peer, (0, 0.0))
        now = self._loop.time()
        if count and now - since > FAILURE_MEMORY:
            count = 0
        if count >= FAILURES_BEFORE_DELAY:
            await asyncio.sleep(min(FAILURE_DELAY_STEP * (count - FAILURES_BEFORE_DELAY + 1), FAILURE_DELAY_MAX))
        running = self._checks.get(pending.key)
        if running is None:
            running = self._checks[pending.key] = self._loop.run_in_executor(None, pending.run)
            running.add_done_callback(lambda _f, key=pending.key: self._checks.pop(key, None))
        ok = await asyncio.shield(running)
        if ok:
            self._failures.pop(peer, None)
        else:
            if len(self._failures) > MAX_TRACKED_ADDRESSES:
                self._failures.clear()
            self._failures[peer] = (count + 1, since if count else now)
        return ok
