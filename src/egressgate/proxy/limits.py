"""Per-client limits and the authentication-check throttles: the state about clients that all
of a worker's connections share.

- ``ClientLimits``: concurrent connections per client (``max_connections``) and new
  connections per second (``max_new_per_second``, a token bucket); over either, ``admit``
  raises ``LimitReached`` (429). A connection counts against one client at a time.
- ``AuthThrottle``: slow password checks (scrypt) run off the event loop on their own
  threads, bounded per source and in total, round-robin over sources, dropped when every
  requester left; many connections presenting the same new credentials share one check; an
  address that keeps failing waits longer before each further check. One for password checks
  (scrypt), one for token signature checks (``AuthChecks`` holds both).
- ``AuthChecks.settle``: what an identification still needs (a password check, the issuer's
  keys, a token's signature check), done in order until the client is known or refused.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..errors import AuthRequired, LimitReached
from ..policy.clients import ClientPolicy, Identity, PendingCheck, PendingKeys, PendingTokenCheck, rejected

FAILURES_BEFORE_DELAY = 5
FAILURE_DELAY_STEP, FAILURE_DELAY_MAX = 0.2, 3.0  # seconds added per failure past the fourth, at most
FAILURE_MEMORY = 60.0  # seconds after which an address's failures are forgotten
MAX_TRACKED_ADDRESSES = 10_000
AUTH_WORKERS = 2  # threads running password checks (their own: never the loop's default executor)
MAX_CHECKS_PER_SOURCE = 4  # password checks waiting or running for one source address
MAX_CHECKS = 256  # ... and for all sources together
BUSY_ANSWER_DELAY = 1.0  # seconds (at most; at least half) a source that failed lately waits for its 429
SUSPECT_SPACING = 0.1  # seconds between the starts of two suspect password checks (at most 10/s)
TOKEN_WORKERS = 1  # threads running token signature checks (a check is well under a millisecond)
MAX_TOKEN_CHECKS_PER_SOURCE = 64  # token signature checks waiting or running for one source address
# (a fleet of pods behind one NAT address presents many new tokens at once; a check is quick)
MAX_TOKEN_CHECKS = 256  # ... and for all sources together
SETTLE_STEPS = 8  # pending steps one identification may take (keys fetched, a check per entry)


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


class _Job:
    __slots__ = ("key", "peer", "pending", "done", "waiters", "started", "suspect")

    def __init__(self, peer: str, pending: PendingCheck | PendingTokenCheck, done: asyncio.Future[bool],
                 suspect: bool) -> None:
        self.key, self.peer, self.pending, self.done = pending.key, peer, pending, done
        self.waiters = 0
        self.started = False
        self.suspect = suspect  # its source failed lately, or had a check outstanding already


class AuthThrottle:
    """Slow authentication checks (``kind``: password or token), bounded and fair. They run
    on their own threads (``workers``), never the loop's default executor (config reloads use
    that one, so a flood never delays a reload). What waits is bounded per source address
    (``per_source``, waiting and running) and in total (``total``); over either the request
    gets 429 before any hashing: at once, or, for a source that failed lately, after up to
    ``BUSY_ANSWER_DELAY`` (its Retry-After; spread, so the refused never come back together),
    so a closed-loop flood's refusals cost the event loop a bounded rate, not as many as it
    can send.

    Two lanes. The one outstanding check of a source with no recent failure is *clean*: clean
    checks start first, a source new to the queue first, on any free thread. Every other check
    (a source that failed lately, or one that already has a check waiting or running) is
    *suspect*: suspect checks (round-robin over sources) hold at most ``workers - 1`` threads
    (one when there is one), one starts only while no clean check waits or runs, and two start
    at least ``suspect_spacing`` apart (passwords: 0.1 s, so a flood's scrypt work takes at
    most about half a core, and guesses are capped at 10 a second per process). So a known
    client's first check never waits behind a flood's, and while it runs it shares the CPU with
    at most the one suspect check already under way. A waiting check whose every requester
    left (the connection closed, its task cancelled) is dropped before it runs."""

    def __init__(self, loop: asyncio.AbstractEventLoop, workers: int = AUTH_WORKERS,
                 per_source: int = MAX_CHECKS_PER_SOURCE, total: int = MAX_CHECKS, kind: str = "password",
                 busy_reason: str = "auth_checks_busy", suspect_spacing: float = SUSPECT_SPACING) -> None:
        self._loop = loop
        self.kind, self.busy_reason = kind, busy_reason
        self._failures: dict[str, tuple[int, float]] = {}
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"egressgate-{kind}")
        self._free = workers
        self._suspect_slots = max(1, workers - 1)
        self._suspect_spacing = suspect_spacing
        self._suspect_next = 0.0  # (loop time) when the next suspect check may start
        self._timer: asyncio.TimerHandle | None = None
        self.per_source_limit, self.total_limit = per_source, total
        self._jobs: dict[bytes, _Job] = {}  # waiting or running, by credentials
        # waiting, by source, round-robin: clean sources, and sources with recent failures
        self._clean: OrderedDict[str, deque[_Job]] = OrderedDict()
        self._suspect: OrderedDict[str, deque[_Job]] = OrderedDict()
        self._running = {False: 0, True: 0}  # checks running, clean and suspect
        self._by_source: dict[str, int] = {}  # waiting or running, by source
        self.dropped = 0  # waiting checks dropped because every requester left
        self.busy = 0  # checks refused (429) over the per-source or total bound

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._clean.values()) + sum(len(q) for q in self._suspect.values())

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    def stats(self) -> dict[str, int]:
        """Plain counters for the metrics: checks waiting and running now; dropped because every
        requester left (client_gone) and refused over a bound (busy) since start."""
        running = self._running[False] + self._running[True]
        return {"waiting": len(self._jobs) - running, "running": running, "client_gone": self.dropped,
                "busy": self.busy}

    def _failed_lately(self, peer: str, now: float) -> int:
        count, since = self._failures.get(peer, (0, 0.0))
        return 0 if count and now - since > FAILURE_MEMORY else count

    async def check(self, peer: str, pending: PendingCheck | PendingTokenCheck) -> bool:
        """Run a slow check off the loop; addresses that keep failing wait longer."""
        now = self._loop.time()
        count = self._failed_lately(peer, now)
        since = self._failures.get(peer, (0, now))[1] if count else now
        if count >= FAILURES_BEFORE_DELAY:
            await asyncio.sleep(min(FAILURE_DELAY_STEP * (count - FAILURES_BEFORE_DELAY + 1), FAILURE_DELAY_MAX))
        job = self._jobs.get(pending.key)
        if job is None:
            try:
                job = self._enqueue(peer, pending, count > 0)
            except LimitReached:
                if count:  # a source that failed lately hears 429 when it may retry (Retry-After: 1), so
                    # a flood's retries come no faster than that and its refusals cost the loop little
                    await asyncio.sleep(BUSY_ANSWER_DELAY * (0.5 + random.random() / 2))  # (spread: no herd)
                raise
        job.waiters += 1
        try:
            ok = await asyncio.shield(job.done)
        except asyncio.CancelledError:
            job.waiters -= 1
            if job.waiters == 0 and not job.started:
                self._drop(job)
            raise
        if ok:
            self._failures.pop(peer, None)
        else:
            if len(self._failures) > MAX_TRACKED_ADDRESSES:
                self._failures.pop(next(iter(self._failures)))
            self._failures[peer] = (count + 1, since)
        return ok

    def _enqueue(self, peer: str, pending: PendingCheck | PendingTokenCheck, suspect: bool) -> _Job:
        if self._by_source.get(peer, 0) >= self.per_source_limit:
            self.busy += 1
            raise LimitReached(f"too many {self.kind} checks from {peer} at once (at most {self.per_source_limit})",
                               reason=self.busy_reason, headers=(("Retry-After", "1"),))
        if len(self._jobs) >= self.total_limit:
            self.busy += 1
            raise LimitReached(f"too many {self.kind} checks at once (at most {self.total_limit})",
                               reason=self.busy_reason, headers=(("Retry-After", "1"),))
        # a source's one outstanding check is clean unless it failed lately; a second at once is not
        suspect = suspect or peer in self._by_source
        queues = self._suspect if suspect else self._clean  # (a source may have checks waiting in both)
        job = self._jobs[pending.key] = _Job(peer, pending, self._loop.create_future(), suspect)
        self._by_source[peer] = self._by_source.get(peer, 0) + 1
        queues.setdefault(peer, deque()).append(job)
        if not suspect:
            queues.move_to_end(peer, last=False)  # a source new to the queue is not behind a flood's
        self._pump()
        return job

    def _pump(self) -> None:
        while self._free > 0:
            if self._clean:
                queues = self._clean
            elif self._suspect and self._running[False] == 0 and self._running[True] < self._suspect_slots:
                now = self._loop.time()
                if now < self._suspect_next:  # spaced: a flood's checks take a bounded share of the CPU
                    if self._timer is None:
                        self._timer = self._loop.call_at(self._suspect_next, self._spaced)
                    return
                self._suspect_next = now + self._suspect_spacing
                queues = self._suspect
            else:
                return
            peer, queue = next(iter(queues.items()))
            job = queue.popleft()
            queues.pop(peer)
            if queue:
                queues[peer] = queue  # to the back: the next source goes first
            job.started = True
            self._free -= 1
            self._running[job.suspect] += 1
            running = self._loop.run_in_executor(self._pool, job.pending.run)
            running.add_done_callback(lambda f, job=job: self._finished(job, f))

    def _spaced(self) -> None:
        self._timer = None
        self._pump()

    def _finished(self, job: _Job, running: asyncio.Future[bool]) -> None:
        self._free += 1
        self._running[job.suspect] -= 1
        self._forget(job)
        if not job.done.done():
            if running.cancelled():
                job.done.cancel()
            elif running.exception() is not None:
                job.done.set_exception(running.exception())
            else:
                job.done.set_result(running.result())
        self._pump()

    def _drop(self, job: _Job) -> None:
        queues = self._suspect if job.suspect else self._clean
        queue = queues.get(job.peer)
        if queue is not None and job in queue:
            queue.remove(job)
            if not queue:
                del queues[job.peer]
        self._forget(job)
        self.dropped += 1
        job.done.cancel()

    def _forget(self, job: _Job) -> None:
        if self._jobs.get(job.key) is job:
            del self._jobs[job.key]
        n = self._by_source.get(job.peer, 0) - 1
        if n > 0:
            self._by_source[job.peer] = n
        else:
            self._by_source.pop(job.peer, None)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


PendingAuth = PendingCheck | PendingKeys | PendingTokenCheck  # what an identification may still need


class AuthChecks:
    """The worker's two check throttles (passwords, token signatures) and the loop that takes
    an identification from pending to known."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.passwords = AuthThrottle(loop)
        self.tokens = AuthThrottle(loop, TOKEN_WORKERS, MAX_TOKEN_CHECKS_PER_SOURCE, MAX_TOKEN_CHECKS,
                                   kind="token", busy_reason="token_checks_busy", suspect_spacing=0.0)
        self.throttles = (self.passwords, self.tokens)

    async def settle(self, identify: Callable[[], Identity | PendingAuth], peer: str, pending: PendingAuth) -> Identity:
        """Do what ``pending`` needs, ask ``identify`` again, until it answers an ``Identity``;
        raises the refusal (407), or 429 over a throttle's bounds."""
        for _ in range(SETTLE_STEPS):
            if isinstance(pending, PendingCheck):
                result = identify() if await self.passwords.check(peer, pending) else None
                if not isinstance(result, Identity):
                    raise rejected(pending.user, "bad_credentials")
            elif isinstance(pending, PendingKeys):
                await pending.wait()
                result = identify()
                if isinstance(result, PendingKeys):
                    raise pending.error  # the keys fetched (or kept) still lack the token's key
            else:
                ok = await self.tokens.check(peer, pending)
                result = identify()
                if not ok and isinstance(result, PendingTokenCheck) and result.key == pending.key:
                    raise pending.error  # a refusal not remembered (the same check asked for again)
            if isinstance(result, Identity):
                return result
            pending = result
        raise AuthRequired("credentials could not be verified", reason="bad_credentials")

    def stats(self) -> dict[str, dict[str, int]]:
        return {throttle.kind: throttle.stats() for throttle in self.throttles}

    def close(self) -> None:
        for throttle in self.throttles:
            throttle.close()
