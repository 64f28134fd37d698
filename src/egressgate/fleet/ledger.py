"""The owner's accounts of shared-IP budgets (pure: an injected clock, no I/O).

Every budget is keyed by configured names, ``(profile, member, rule)``, and shared between
*holders* (the worker processes of one instance; with a fleet store, the instances):

- concurrency: ``grant_slots`` leases slots of ``max_concurrent`` to a holder, never more
  than the limit in all; a holder keeps its slots (idle ones too) until it gives them back
  (``return_slots``: on the owner's reclaim, or when it goes away: ``drop``). A holder
  admits on its own while it has a slot free, so the sum of what the holders admit can
  never pass the limit.
- rate: one token bucket per key (burst ``max(1, rate)``), from which ``grant_tokens`` hands
  out slices of tokens. A holder spends them within ``TOKEN_TTL`` or gives the rest back.
  Over any window of W seconds the holders admit at most ``max(1, rate) + rate * (W +
  TOKEN_TTL)``: what left the bucket in [t - TOKEN_TTL, t + W].
"""

from __future__ import annotations

import math
from collections.abc import Callable

Key = tuple[str, str, str]  # (profile, member label, rule name)
TOKEN_TTL = 1.0  # seconds a holder may keep a slice of rate tokens before it gives the rest back
SLICE_SECONDS = 0.1  # a holder asks for this much of a rate at a time (at least one token)


def slice_of(rate: float) -> int:
    """How many tokens a holder asks for at once."""
    return max(1, math.floor(rate * SLICE_SECONDS))


def burst_of(rate: float) -> float:
    return rate if rate > 1.0 else 1.0


class Ledger:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._slots: dict[Key, dict[int, int]] = {}  # key -> holder -> slots leased
        self._buckets: dict[Key, tuple[float, float]] = {}  # key -> (tokens, at)

    # --- concurrency ------------------------------------------------------------------------
    def leased(self, key: Key) -> int:
        held = self._slots.get(key)
        return sum(held.values()) if held else 0

    def leased_keys(self) -> list[Key]:
        """Keys with slots leased to someone."""
        return list(self._slots)

    def slots_of(self, holder: int, key: Key) -> int:
        held = self._slots.get(key)
        return held.get(holder, 0) if held else 0

    def grant_slots(self, holder: int, key: Key, limit: int, want: int) -> int:
        """Up to ``want`` more slots for ``holder`` (0 when every slot is leased)."""
        held = self._slots.get(key)
        if held is None:
            held = self._slots[key] = {}
        free = limit - sum(held.values())
        n = want if want < free else free
        if n <= 0:
            return 0
        held[holder] = held.get(holder, 0) + n
        return n

    def return_slots(self, holder: int, key: Key, n: int) -> None:
        held = self._slots.get(key)
        if not held or n <= 0:
            return
        left = held.get(holder, 0) - n
        if left > 0:
            held[holder] = left
        else:
            held.pop(holder, None)
            if not held:
                del self._slots[key]

    def holders(self, key: Key, besides: int) -> list[int]:
        """Who else holds slots of ``key`` (whom a reclaim asks)."""
        held = self._slots.get(key)
        return [h for h, n in held.items() if h != besides and n > 0] if held else []

    # --- rate --------------------------------------------------------------------------------
    def _tokens(self, key: Key, rate: float, now: float) -> float:
        burst = burst_of(rate)
        bucket = self._buckets.get(key)
        if bucket is None:
            return burst
        tokens = bucket[0] + (now - bucket[1]) * rate
        return burst if tokens > burst else tokens

    def grant_tokens(self, key: Key, rate: float, want: int) -> tuple[int, float]:
        """(tokens granted, seconds until the next one when none is)."""
        now = self._clock()
        tokens = self._tokens(key, rate, now)
        n = min(want, math.floor(tokens))
        if n <= 0:
            self._buckets[key] = (tokens, now)
            return 0, (1.0 - tokens) / rate
        self._buckets[key] = (tokens - n, now)
        return n, 0.0

    def return_tokens(self, key: Key, rate: float, n: int) -> None:
        """Tokens a holder did not spend within ``TOKEN_TTL`` go back (the bucket stays capped)."""
        if n <= 0:
            return
        now = self._clock()
        tokens = self._tokens(key, rate, now) + n
        burst = burst_of(rate)
        self._buckets[key] = (burst if tokens > burst else tokens, now)

    # --- holders -----------------------------------------------------------------------------
    def drop(self, holder: int) -> int:
        """A holder went away (its process died): every slot it held comes back. Returns how many."""
        freed = 0
        for key in list(self._slots):
            held = self._slots[key]
            freed += held.pop(holder, 0)
            if not held:
                del self._slots[key]
        return freed

    def snapshot(self) -> dict:
        return {"slots": {"|".join(k): dict(v) for k, v in self._slots.items()}}
