"""Where an instance's shared-IP budgets come from: its configuration alone (``Alone``), or
a fleet store shared by every instance (``Fleet``: Redis). The instance's owner
(``owner.Owner``) asks its source how many concurrency slots the instance may lease to its
workers (``cap``), for more when they are all in use (``more_slots``), and for rate tokens.

``Fleet``, the model:

- concurrency: the instance holds slots of each key in the store (``acquire``, one at a time,
  when its workers need one more than it holds) and keeps them while they are used; every
  heartbeat (``lease_ttl / 3``) renews its lease and gives back idle slots beyond ``SPARE``.
  An instance that runs short publishes ``want``: the others give back their idle slots
  (their workers' too) at once, and it looks again for up to ``fleet.redis.timeout``. A dead instance's heartbeat lapses: its slots come back to
  the others within ``lease_ttl``.
- rates: one token bucket per key in the store; the instance takes slices of
  ``FLEET_SLICE`` seconds of the rate (refilled ahead of need: no store round trip on the
  request path while it has tokens); a slice lapses after ``ledger.TOKEN_TTL``. Over any
  window of W seconds the fleet admits at most ``max(1, rate) + rate * (W + RATE_SLACK)``.
- block states (block-aware egress: a member ``blocked`` or ``reverified`` for a provider) and
  holds: published on the store's channel (every instance applies them within a second:
  at once, by pub/sub) and saved with their expiry for instances that start later.
- the store slow or down (an operation not answered within ``fleet.redis.timeout``): the
  fallback (``fleet.fallback``) applies at once and until a heartbeat succeeds again --
  ``share``: each instance keeps ``floor(limit / instances)`` slots and ``rate / instances``
  (instances: ``fleet.fallback_instances``, else as last seen in the store); ``local``: the
  whole limit; ``refuse``: none. Logged once per change (``fleet_store_down`` /
  ``fleet_store_up``), counted (``egressgate_fleet_store_errors_total``), shown
  (``egressgate_fleet_store_up``). Requests never wait for the store longer than its timeout.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable

from ..observe.accesslog import log_event
from .ledger import TOKEN_TTL, Key, Ledger, slice_of

SPARE = 1  # idle slots an instance keeps per key between heartbeats
FLEET_SLICE = 0.2  # seconds of a rate an instance takes from the store at once
RATE_SLACK = 2 * TOKEN_TTL  # an instance's slice and a worker's slice may each be spent up to TOKEN_TTL late
WANT_WAIT = 0.02  # after publishing `want`, the first pause before looking again (doubling, up to the timeout)
MORE_SLOTS_WAIT = 2  # a request waits at most this many store timeouts for one more slot
RESUBSCRIBE = 1.0  # seconds between attempts to listen on the store's channel again


class Alone:
    """The configured figures are the instance's own (no fleet store)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def cap(self, key: Key, limit: int) -> int:
        return limit

    async def more_slots(self, key: Key, limit: int) -> None:
        return None

    def try_tokens(self, key: Key, rate: float) -> int:
        return self.ledger.grant_tokens(key, rate, slice_of(rate))[0]

    async def tokens(self, key: Key, rate: float) -> tuple[int, float]:
        return self.ledger.grant_tokens(key, rate, slice_of(rate))

    def return_tokens(self, key: Key, rate: float, n: int) -> None:
        self.ledger.return_tokens(key, rate, n)

    def hold_learned(self, doc: dict) -> None:
        pass

    def block_learned(self, doc: dict) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


class Fleet:
    def __init__(self, store, ledger: Ledger, clock: Callable[[], float], fallback: str,
                 fallback_instances: int | None, lease_ttl: float,
                 apply_hold: Callable[[dict], None], give_back_idle: Callable[[Key], Awaitable[None]],
                 metrics, on_error: Callable[[str, BaseException], None]) -> None:
        self.store = store
        self.ledger = ledger
        self._clock = clock
        self.fallback = fallback
        self.fallback_instances = fallback_instances
        self.lease_ttl = lease_ttl
        self._apply_hold = apply_hold  # a hold from another instance: this instance's guards hold it
        self.apply_block: Callable[[dict], None] = lambda doc: None  # a block state from another instance
        self._give_back_idle = give_back_idle  # the workers' idle slots of a key come back to the owner
        self.metrics = metrics
        self._on_error = on_error
        self.up = False
        self.instances = 0  # live instances, as last seen in the store
        self.caps: dict[Key, int] = {}  # slots this instance holds in the store
        self._stock: dict[Key, list] = {}  # [tokens, when they lapse]
        self._refilling: dict[Key, asyncio.Task] = {}
        self._tasks: list[asyncio.Task] = []
        self._beat_now = asyncio.Event()
        self._down_since: float | None = None
        # An acquire and a heartbeat never overlap: a heartbeat sets the counts it read, and
        # must not overwrite a slot granted meanwhile.
        self._lock = asyncio.Lock()

    # --- health ---------------------------------------------------------------------------------
    def _down(self, op: str, err: BaseException) -> None:
        self.metrics.fleet_store_errors.labels(op).inc()
        if self.up or self._down_since is None:
            self._down_since = self._clock()
            self._spawn(self._went_down(op, str(err)[:300], was_up=self.up))
        self.up = False
        self.metrics.fleet_store_up.set(0)

    async def _went_down(self, op: str, error: str, was_up: bool) -> None:
        """Into the fallback: the workers' idle slots come back first, so what they hold fits
        the instance's share (slots in use finish; none is leased past the share), then it is
        logged."""
        try:
            if was_up:
                for key in self.ledger.leased_keys():
                    await self._give_back_idle(key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._on_error("fleet", exc)
        finally:
            log_event("fleet_store_down", op=op, error=error, fallback=self.fallback, instances=self._divisor())

    def _healthy(self, instances: int) -> None:
        self.instances = instances
        self.metrics.fleet_instances.set(instances)
        if not self.up:
            log_event("fleet_store_up", instances=instances,
                      down_seconds=round(self._clock() - self._down_since, 3) if self._down_since else 0)
            self._down_since = None
        self.up = True
        self.metrics.fleet_store_up.set(1)

    def _divisor(self) -> int:
        return max(1, self.fallback_instances or self.instances or 1)

    # --- concurrency ----------------------------------------------------------------------------
    def cap(self, key: Key, limit: int) -> int:
        if self.up:
            self.caps.setdefault(key, 0)
            return self.caps[key]
        if self.fallback == "local":
            return limit
        if self.fallback == "refuse":
            return 0
        return limit // self._divisor()

    async def more_slots(self, key: Key, limit: int) -> None:
        """One more slot of ``key`` for this instance, if the fleet has one free (or a fleet
        member gives one back within ``WANT_WAIT``). Never waits past the store's timeout per
        call; on a store error the fallback applies from now on."""
        if not self.up:
            return
        try:
            async with asyncio.timeout(MORE_SLOTS_WAIT * self.store.timeout):
                await self._more_slots(key, limit)
        except TimeoutError:
            pass  # (the store answers, slowly: this request is refused; a slot granted meanwhile
            #       is set right by the next heartbeat, which writes what the instance holds)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._down("acquire", exc)

    async def _more_slots(self, key: Key, limit: int) -> None:
        n = await self._acquire(key, limit)
        if n < 0:  # our heartbeat lapsed (a pause, a partition): renew first
            await self._heartbeat(timeout=self.store.timeout)
            n = await self._acquire(key, limit)
        if n == 0:  # ask the others for their idle slots; look again while they give them back
            await self.store.publish({"want": list(key)})
            waited, pause = 0.0, WANT_WAIT
            while n == 0 and waited < self.store.timeout:
                await asyncio.sleep(pause)
                waited += pause
                pause *= 2
                n = await self._acquire(key, limit)

    async def _acquire(self, key: Key, limit: int) -> int:
        async with self._lock:
            n = await self.store.acquire(key, limit, 1)
            if n > 0:
                self.caps[key] = self.caps.get(key, 0) + n
            return n

    # --- rate -------------------------------------------------------------------------------------
    def try_tokens(self, key: Key, rate: float) -> int:
        if not self.up:
            return self._fallback_tokens(key, rate)[0]
        stock = self._stock.get(key)
        now = self._clock()
        n = 0
        if stock is not None and stock[1] > now and stock[0] >= 1:
            n = min(int(stock[0]), slice_of(rate))
            stock[0] -= n
        if (stock is None or stock[1] <= now or stock[0] < slice_of(rate)) and key not in self._refilling:
            task = asyncio.get_running_loop().create_task(self._refill(key, rate))
            self._refilling[key] = task
        return n

    async def tokens(self, key: Key, rate: float) -> tuple[int, float]:
        if self.up:
            n = self.try_tokens(key, rate)
            if n:
                return n, 0.0
            task = self._refilling.get(key)
            if task is not None:
                wait = await asyncio.shield(task)
                n = self.try_tokens(key, rate)
                if n or self.up:
                    return n, wait
        return self._fallback_tokens(key, rate)

    async def _refill(self, key: Key, rate: float) -> float:
        try:
            n, wait = await self.store.tokens(key, rate, max(1, math.floor(rate * FLEET_SLICE)))
            now = self._clock()
            stock = self._stock.get(key)
            if stock is None or stock[1] <= now:
                stock = self._stock[key] = [0, now + TOKEN_TTL]
            stock[0] += n
            return wait
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._down("tokens", exc)
            return 1.0
        finally:
            self._refilling.pop(key, None)

    def _fallback_tokens(self, key: Key, rate: float) -> tuple[int, float]:
        if self.fallback == "refuse":
            return 0, 1.0
        share = rate if self.fallback == "local" else rate / self._divisor()
        return self.ledger.grant_tokens(key, share, slice_of(share))

    def return_tokens(self, key: Key, rate: float, n: int) -> None:
        if not self.up:  # (the fallback bucket is the ledger's)
            self.ledger.return_tokens(key, rate if self.fallback == "local" else rate / self._divisor(), n)
            return
        stock = self._stock.get(key)
        if stock is not None and stock[1] > self._clock():
            stock[0] += n

    # --- holds ------------------------------------------------------------------------------------
    def hold_learned(self, doc: dict) -> None:
        if self.up:
            self._spawn(self._share_hold(doc))

    def block_learned(self, doc: dict) -> None:
        """A block state this instance found (block-aware egress): every other instance takes it."""
        if self.up:
            self._spawn(self._publish("block", {"block": doc}))

    async def _publish(self, op: str, msg: dict) -> None:
        try:
            await self.store.publish(msg)
        except Exception as exc:
            self._down(op, exc)

    async def _share_hold(self, doc: dict) -> None:
        try:
            await self.store.publish({"hold": doc})
            await self.store.save_hold(doc)
        except Exception as exc:
            self._down("hold", exc)

    # --- background -----------------------------------------------------------------------------
    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def start(self) -> None:
        """A first heartbeat and the holds in force (bounded: the fallback applies until the
        store answers), then the heartbeat and the channel in the background."""
        await self._heartbeat(timeout=max(self.store.timeout, 1.0))
        if self.up:
            try:
                for doc in await self.store.load_holds(timeout=max(self.store.timeout, 2.0)):
                    self._apply_hold(doc)
            except Exception as exc:
                self._down("holds", exc)
        loop = asyncio.get_running_loop()
        self._tasks += [loop.create_task(self._beat()), loop.create_task(self._listen())]

    async def close(self) -> None:
        for task in list(self._tasks) + list(self._refilling.values()):
            task.cancel()
        await self.store.close()

    async def _beat(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.lease_ttl / 3):
                    await self._beat_now.wait()
            except TimeoutError:
                pass
            self._beat_now.clear()
            await self._heartbeat(timeout=max(self.store.timeout, min(1.0, self.lease_ttl / 3)))

    async def _heartbeat(self, timeout: float) -> None:
        """Renew the lease, give back idle slots beyond SPARE, learn how many instances live.
        Coming back from the fallback, the slots the workers hold now are the instance's."""
        async with self._lock:
            was_up = self.up
            for key in set(self.caps) | set(self.ledger.leased_keys()):
                used = self.ledger.leased(key)
                if not was_up:
                    self.caps[key] = used
                elif self.caps.get(key, 0) > used + SPARE:
                    self.caps[key] = used + SPARE
            try:
                n = await self.store.heartbeat(dict(self.caps), self.lease_ttl, timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._down("heartbeat", exc)
                return
            self.caps = {k: v for k, v in self.caps.items() if v > 0}
            self._healthy(n)

    async def _listen(self) -> None:
        """Holds and wants from other instances, as they are published; resubscribes after errors."""
        while True:
            pubsub = None
            try:
                pubsub = self.store.pubsub()
                async with asyncio.timeout(max(self.store.timeout, 1.0)):
                    await pubsub.subscribe(self.store.channel)
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None:
                        self._event(msg.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._down("subscribe", exc)
            finally:
                if pubsub is not None:
                    try:
                        await pubsub.aclose()
                    except Exception:  # (a broken connection: nothing left to close cleanly)
                        pass
            await asyncio.sleep(RESUBSCRIBE)

    def _event(self, data) -> None:
        try:
            msg = json.loads(data)
        except (TypeError, ValueError):
            return
        if not isinstance(msg, dict) or msg.get("from") == self.store.instance:
            return
        if isinstance(msg.get("hold"), dict):
            self._apply_hold(msg["hold"])
        if isinstance(msg.get("block"), dict):
            self.apply_block(msg["block"])
        want = msg.get("want")
        if isinstance(want, list) and len(want) == 3 and all(isinstance(w, str) for w in want):
            self._spawn(self._give_back(tuple(want)))

    async def _give_back(self, key: Key) -> None:
        """Another instance is short of ``key``: our idle slots (our workers' too) go back now."""
        if key not in self.caps:
            return
        await self._give_back_idle(key)
        used = self.ledger.leased(key)
        if self.caps.get(key, 0) > used:
            self.caps[key] = used
            self._beat_now.set()
