"""Shared-IP protection, the pure part: a profile's ``protect`` rules compiled once, which
rule (if any) a destination falls under, and how long an origin's ``Retry-After`` holds.

A rule names destinations (the patterns of a client's ``allow``: ``api.example.com``,
``*.example.com``, a CIDR, each optionally ``:PORT``) and limits that apply per egress member
(one source address or upstream proxy of the profile) across every client of the profile:

- ``max_concurrent``: open tunnels plus forwarded requests in flight;
- ``max_per_second``: new tunnels plus forwarded requests (a token bucket, burst
  ``max(1, rate)``);
- ``max_hold``: the longest an origin's ``429``/``503`` with ``Retry-After`` holds the
  (member x host) it answered, and the address it answered from (0: never);
- ``max_holds``, ``max_holds_per_client``: how many holds the rule keeps per profile, and of
  those how many one client's requests may have caused (``proxy.holds``: no client can
  evict a hold it did not cause);
- ``queue`` (``max_wait``, ``max_queued``): over budget, wait for a turn instead of a 429
  (``proxy.waiting``).

A destination matched by several rules falls under the most specific pattern (exact name,
then the longest ``*.suffix``, then a CIDR). The stateful limiter is ``proxy.protect``.
"""

from __future__ import annotations

import email.utils
from collections.abc import Iterable

from ..config.schema import MAX_HOLDS, MAX_HOLDS_PER_CLIENT
from ..model import HostPort
from .rules import RuleSet

BACKOFF_STATUSES = frozenset({429, 503})
MATCH_CACHE = 4096  # hosts whose rule (or none) is remembered; the cache is emptied when full
MAX_RETRY_AFTER_DIGITS = 10  # a delta-seconds value longer than this is nonsense, not a hold


class ProtectRule:
    """One compiled ``protect`` entry; ``name`` is its label in metrics, status and answers."""

    __slots__ = ("name", "destinations", "max_concurrent", "max_per_second", "max_hold", "max_holds",
                 "max_holds_per_client", "max_wait", "max_queued")

    def __init__(self, name: str, destinations: tuple[str, ...], max_concurrent: int | None,
                 max_per_second: float | None, max_hold: float, max_holds: int = MAX_HOLDS,
                 max_holds_per_client: int = MAX_HOLDS_PER_CLIENT, max_wait: float | None = None,
                 max_queued: int = 0) -> None:
        self.name = name
        self.destinations = destinations
        self.max_concurrent = max_concurrent
        self.max_per_second = max_per_second
        self.max_hold = max_hold
        self.max_holds = max_holds
        self.max_holds_per_client = max_holds_per_client
        self.max_wait = max_wait  # over budget: wait this long for a turn (None: 429 at once)
        self.max_queued = max_queued  # waiting at most, per member

    def describe(self) -> dict:
        return {"name": self.name, "destinations": list(self.destinations), "max_concurrent": self.max_concurrent,
                "max_per_second": self.max_per_second, "max_hold": self.max_hold, "max_holds": self.max_holds,
                "max_holds_per_client": self.max_holds_per_client,
                "queue": None if self.max_wait is None else {"max_wait": self.max_wait,
                                                              "max_queued": self.max_queued}}


class ProfileProtect:
    """The ``protect`` rules of one profile, matched in O(labels) (``policy.rules.RuleSet``)."""

    __slots__ = ("rules", "_matcher", "_by_pattern", "_cache", "_cache_size")

    def __init__(self, rules: list[ProtectRule], cache_size: int = MATCH_CACHE) -> None:
        self.rules = rules
        self._by_pattern: dict[str, ProtectRule] = {}
        for rule in rules:
            for pattern in rule.destinations:
                self._by_pattern.setdefault(pattern, rule)  # (the first rule listing a pattern)
        self._matcher = RuleSet(self._by_pattern)
        # host -> its rule or None, when no pattern names a port (then the host alone decides)
        self._cache: dict[str, ProtectRule | None] | None = None if self._matcher.ports else {}
        self._cache_size = cache_size

    def match(self, dest: HostPort) -> ProtectRule | None:
        cache = self._cache
        if cache is not None:
            try:
                return cache[dest.host]
            except KeyError:
                pass
        text = self._matcher.match(dest.host, dest.port, dest.is_ip)
        rule = self._by_pattern[text] if text is not None else None
        if cache is not None:
            if len(cache) >= self._cache_size:
                cache.clear()
            cache[dest.host] = rule
        return rule


def compile_protect(specs: Iterable) -> ProfileProtect | None:
    """``specs`` are ``ProtectConfig``s; None when there are none (the profile pays nothing)."""
    rules = [ProtectRule(s.label, tuple(s.destinations), s.max_concurrent, s.max_per_second, s.max_hold,
                         s.max_holds, s.max_holds_per_client, s.queue.max_wait if s.queue else None,
                         s.queue.max_queued if s.queue else 0) for s in specs]
    return ProfileProtect(rules) if rules else None


def retry_after_seconds(value: bytes | None, now_wall: float) -> float | None:
    """Seconds an origin asked to wait (``Retry-After``: delta-seconds or an HTTP-date), or
    None when the value is absent, unreadable or already past."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        if len(text) > MAX_RETRY_AFTER_DIGITS:
            return None
        seconds = float(int(text))
    else:
        try:
            when = email.utils.parsedate_to_datetime(text.decode("latin-1"))
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = when.timestamp() - now_wall
    return seconds if seconds > 0 else None


def hold_seconds(rule: ProtectRule, status: int, retry_after: bytes | None, now_wall: float) -> float | None:
    """How long an origin's answer holds (member x host) under ``rule``: the origin's
    ``Retry-After`` on a 429 or 503, capped by ``max_hold``; None for no hold."""
    if status not in BACKOFF_STATUSES or rule.max_hold <= 0:
        return None
    seconds = retry_after_seconds(retry_after, now_wall)
    if seconds is None:
        return None
    return min(seconds, rule.max_hold)


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of a header (``name`` in lower case)."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None
