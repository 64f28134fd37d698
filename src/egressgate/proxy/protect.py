"""Shared-IP protection, the state: one ``SharedIpGuard`` per worker counts, across every
client, what each egress member sends to each protected destination (``policy.protect``
compiles the rules), and remembers the holds origins asked for.

- ``admit_route``: called once per request or tunnel at the route step (``dispatch``). A
  profile without ``protect`` rules costs one dict lookup on a runtime that has some, and
  one truthiness test on one that has none. A destination under a rule is admitted against
  the route's first member -- a hold on (member x host), then ``max_concurrent``, then
  ``max_per_second`` -- or refused with ``LimitReached`` (429, ``Retry-After``, the limit
  named in ``Proxy-Status`` details). Admitted, it gets a ``Ticket`` on its access record.
- The ticket is released when that record is finished (``observe.outcomes``): the one place
  every request and tunnel ends, whatever ends it. A connector that fails over to another
  member moves the ticket there (``Ticket.moved``).
- A forwarded response ``429``/``503`` with ``Retry-After`` (seen in ``forward.Exchange``)
  holds (member x host) for that long, capped by the rule's ``max_hold``: new requests and
  tunnels there are answered locally with 429 and the remaining ``Retry-After``.

Bounded: counters are keyed by configured names (profile, member, rule), never raw hosts;
holds (keyed by host) expire, and at most ``MAX_HOLDS`` are kept (the soonest to end is
dropped first). Per worker process, like ``limits.ClientLimits``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from ..errors import LimitReached
from ..model import AccessRecord
from ..observe.accesslog import log_event
from ..policy.protect import ProfileProtect, ProtectRule, header, hold_seconds
from .route import Route

MAX_HOLDS = 4096
HOLDS_SHOWN = 100  # in /status and whoami, soonest to end first
LIMITS = ("concurrency", "rate", "hold")  # egressgate_protect_refused_total{limit}

Key = tuple[str, str, str]  # (profile, member label, rule name)


class Hold:
    __slots__ = ("until", "rule", "status", "seconds")

    def __init__(self, until: float, rule: str, status: int, seconds: float) -> None:
        self.until = until
        self.rule = rule
        self.status = status
        self.seconds = seconds


class Ticket:
    """One admitted request or tunnel: counted in flight until ``release``."""

    __slots__ = ("guard", "key", "rule", "host", "live")

    def __init__(self, guard: SharedIpGuard, key: Key, rule: ProtectRule, host: str) -> None:
        self.guard = guard
        self.key = key  # (profile, member, rule name)
        self.rule = rule
        self.host = host
        self.live = True

    @property
    def profile(self) -> str:
        return self.key[0]

    @property
    def member(self) -> str:
        return self.key[1]

    def release(self) -> None:
        if self.live:
            self.live = False
            self.guard.release(self.key)

    def moved(self, member: str) -> None:
        """The connector used another member than the first (failover): count it there."""
        if member != self.key[1] and self.live:
            self.guard.release(self.key)
            self.key = (self.key[0], member, self.key[2])
            self.guard.count(self.key)

    def answered(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """A forwarded response head (429 or 503): hold (member x host) if it says for how long."""
        self.guard.backoff(self, status, header(headers, b"retry-after"))


class SharedIpGuard:
    def __init__(self, clock: Callable[[], float], wall: Callable[[], float] = time.time,
                 max_holds: int = MAX_HOLDS) -> None:
        self._clock = clock
        self._wall = wall
        self.max_holds = max_holds
        self.in_flight: dict[Key, int] = {}
        self.admitted: dict[Key, int] = {}
        self.refused: dict[tuple[str, str, str, str], int] = {}  # key + limit
        self.holds_started: dict[Key, int] = {}
        self._buckets: dict[Key, tuple[float, float]] = {}
        self.holds: dict[tuple[str, str, str], Hold] = {}  # (profile, member, host)

    # --- admission --------------------------------------------------------------------------
    def admit(self, profile: str, member: str, rule: ProtectRule, host: str) -> Ticket:
        """Count one request or tunnel to ``host`` through ``member``, or raise ``LimitReached``."""
        key = (profile, member, rule.name)
        now = self._clock()
        if self.holds:
            hold = self.holds.get((profile, member, host))
            if hold is not None:
                left = hold.until - now
                if left > 0:
                    self._refuse(key, "hold", left,
                                 f"protect {rule.name} (profile {profile}, egress {member}): {host} answered "
                                 f"{hold.status} with Retry-After; held for {left:.0f}s more",
                                 "origin_backoff")
                del self.holds[(profile, member, host)]
        in_flight = self.in_flight.get(key, 0)
        limit = rule.max_concurrent
        if limit is not None and in_flight >= limit:
            self._refuse(key, "concurrency", 1.0,
                         f"protect {rule.name} (profile {profile}, egress {member}): max_concurrent {limit} "
                         f"reached", "egress_concurrency_limit")
        rate = rule.max_per_second
        if rate is not None:
            bucket = self._buckets.get(key)
            if bucket is None:
                tokens = rate if rate > 1.0 else 1.0  # (a full bucket: burst max(1, rate))
            else:
                tokens = bucket[0] + (now - bucket[1]) * rate
                if tokens > 1.0 and tokens > rate:
                    tokens = rate if rate > 1.0 else 1.0
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                self._refuse(key, "rate", (1.0 - tokens) / rate,
                             f"protect {rule.name} (profile {profile}, egress {member}): max_per_second {rate:g} "
                             f"reached", "egress_rate_limit")
            self._buckets[key] = (tokens - 1.0, now)
        self.in_flight[key] = in_flight + 1
        self.admitted[key] = self.admitted.get(key, 0) + 1
        return Ticket(self, key, rule, host)

    def _refuse(self, key: Key, limit: str, wait: float, detail: str, reason: str) -> None:
        rkey = (*key, limit)
        self.refused[rkey] = self.refused.get(rkey, 0) + 1
        seconds = max(1, math.ceil(wait))
        raise LimitReached(detail, reason=reason, headers=(("Retry-After", str(seconds)),))

    def count(self, key: Key) -> None:
        self.in_flight[key] = self.in_flight.get(key, 0) + 1

    def release(self, key: Key) -> None:
        n = self.in_flight.get(key, 0)
        self.in_flight[key] = n - 1 if n > 0 else 0  # (kept at 0: the gauge stays exported)

    # --- holds --------------------------------------------------------------------------------
    def backoff(self, ticket: Ticket, status: int, retry_after: bytes | None) -> None:
        seconds = hold_seconds(ticket.rule, status, retry_after, self._wall())
        if seconds is None:
            return
        now = self._clock()
        where = (*ticket.key[:2], ticket.host)
        if where not in self.holds and len(self.holds) >= self.max_holds:
            self._make_room(now)
        self.holds[where] = Hold(now + seconds, ticket.rule.name, status, seconds)
        key = ticket.key
        self.holds_started[key] = self.holds_started.get(key, 0) + 1
        log_event("protect_hold", profile=ticket.profile, member=ticket.member, host=ticket.host[:255],
                  rule=ticket.rule.name, status=status, seconds=round(seconds, 3))

    def _make_room(self, now: float) -> None:
        for where in [w for w, h in self.holds.items() if h.until <= now]:
            del self.holds[where]
        if len(self.holds) >= self.max_holds:
            del self.holds[min(self.holds, key=lambda w: self.holds[w].until)]

    # --- what status, whoami and metrics show --------------------------------------------------
    def current_holds(self, profile: str | None = None) -> list[dict]:
        now = self._clock()
        live = [(w, h) for w, h in list(self.holds.items()) if h.until > now and (profile is None or w[0] == profile)]
        live.sort(key=lambda item: item[1].until)
        return [{"profile": w[0], "member": w[1], "host": w[2], "rule": h.rule, "status": h.status,
                 "remaining_seconds": round(h.until - now, 3)} for w, h in live[:HOLDS_SHOWN]]

    def view(self, protect: ProfileProtect | None, profile: str, members: list[str]) -> dict | None:
        """One profile's rules with, per member, what is in flight and was admitted or refused."""
        if protect is None:
            return None
        rules = []
        for rule in protect.rules:
            per_member = {}
            for m in members:
                key = (profile, m, rule.name)
                per_member[m] = {"in_flight": self.in_flight.get(key, 0), "admitted": self.admitted.get(key, 0),
                                 "refused": {limit: self.refused.get((*key, limit), 0) for limit in LIMITS}}
            rules.append({**rule.describe(), "members": per_member})
        return {"rules": rules, "holds": self.current_holds(profile)}

    def stats(self) -> dict:
        """Plain counters for ``observe.metrics`` (read at scrape time)."""
        now = self._clock()
        held: dict[Key, int] = {}
        for (profile, member, _), h in list(self.holds.items()):
            if h.until > now:
                key = (profile, member, h.rule)
                held[key] = held.get(key, 0) + 1
        return {"admitted": dict(self.admitted), "refused": dict(self.refused), "in_flight": dict(self.in_flight),
                "holds_started": dict(self.holds_started), "held": held}


def admit_route(guard: SharedIpGuard, protect: dict[str, ProfileProtect], r: Route, rec: AccessRecord) -> None:
    """The route step's hook: admit ``r`` if its destination is under one of its profile's
    rules (the ticket goes on ``rec``), else do nothing. Raises ``LimitReached`` (429)."""
    rules = protect.get(r.pool.name)
    if rules is None or not r.plans:
        return
    rule = rules.match(r.dest)
    if rule is not None:
        member = r.plans[0].label
        try:
            rec.protect = guard.admit(r.pool.name, member, rule, r.dest.host)
        except LimitReached:  # the record says which member hit which rule's limit
            rec.egress_addr = member
            rec.extra = {**(rec.extra or {}), "protect_rule": rule.name}
            raise
