"""Shared-IP protection, the state: one ``SharedIpGuard`` per worker counts, across every
client, what each egress member sends to each protected destination (``policy.protect``
compiles the rules), and remembers the holds origins asked for.

- ``admit_route``: called once per request or tunnel once its route is judged (its
  addresses known: ``dispatch``). A profile without ``protect`` rules costs one dict lookup
  on a runtime that has some, and one truthiness test on one that has none. A destination
  under a rule is admitted against the route's first member -- a hold on (member x host) or
  (member x any address it may be dialed to), then ``max_concurrent``, then
  ``max_per_second`` -- or refused with ``LimitReached`` (429, ``Retry-After``, the limit
  named in ``Proxy-Status`` details). Admitted, it gets a ``Ticket`` on its access record.
- The ticket is released when that record is finished (``observe.outcomes``): the one place
  every request and tunnel ends, whatever ends it. The connector's link tells the ticket the
  member and origin address really used (``Ticket.moved``: a failover counts there).
- A forwarded response ``429``/``503`` with ``Retry-After`` (seen in ``forward.Exchange``)
  holds (member x host) and (member x the connected address) for that long, capped by the
  rule's ``max_hold``, charged to the client whose request got it: new requests and
  tunnels there are answered locally with 429 and the remaining ``Retry-After``.

Bounded: counters are keyed by configured names (profile, member, rule), never raw hosts;
holds (``holds.HoldTable``: keyed by rule and by both the host name and the connected
address) expire and are bounded per rule and per client, and no client can evict a hold it
did not cause. Per worker process, like ``limits.ClientLimits``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

from ..errors import LimitReached
from ..fleet.ledger import TOKEN_TTL
from ..model import AccessRecord
from ..observe.accesslog import log_event
from ..policy.protect import ProfileProtect, ProtectRule, header, hold_seconds
from .holds import Hold, HoldTable
from .route import Route
from .waiting import Waitlines

HOLDS_SHOWN = 100  # in /status and whoami, soonest to end first
LIMITS = ("concurrency", "rate", "hold", "queue")  # egressgate_protect_refused_total{limit}

Key = tuple[str, str, str]  # (profile, member label, rule name)


class Budget(Protocol):
    """Where a guard's budgets come from when they are shared (``workers: N``, a fleet store:
    ``fleet``): slices leased from an owner. The ``try_`` calls answer at once (0: ask, and
    await); the others may wait for the owner (0: nothing is free anywhere)."""

    def try_slots(self, key: Key, limit: int) -> int: ...
    async def slots(self, key: Key, limit: int) -> int: ...
    def try_tokens(self, key: Key, rate: float) -> int: ...
    async def tokens(self, key: Key, rate: float) -> tuple[int, float]: ...
    def give_back(self, key: Key, slots: int, tokens: int, rate: float | None) -> None: ...
    def hold_learned(self, doc: dict) -> None: ...


class OverBudget(LimitReached):
    """A 429 of a protect rule, with what the hold queue needs to wait instead: the key, the
    rule, which limit (``concurrency``, ``rate``, ``hold``, or ``queued``: others wait for this
    key already) and how long until trying again makes sense."""

    def __init__(self, detail: str, key: Key, rule: ProtectRule, limit: str, wait: float, reason: str) -> None:
        super().__init__(detail, reason=reason, headers=(("Retry-After", str(max(1, math.ceil(wait)))),))
        self.key = key
        self.rule = rule
        self.limit = limit
        self.wait = wait


class LeaseNeeded(Exception):  # noqa: N818 (a signal to the dispatcher, not an error)
    """Admission needs a slice of a shared budget from the owner first: await
    ``SharedIpGuard.acquire(this)``, then admit again."""

    def __init__(self, key: Key, rule: ProtectRule, slots: bool, tokens: bool) -> None:
        super().__init__(key)
        self.key = key
        self.rule = rule
        self.slots = slots
        self.tokens = tokens


class Ticket:
    """One admitted request or tunnel: counted in flight until ``release``."""

    __slots__ = ("guard", "key", "rule", "host", "client", "address", "live")

    def __init__(self, guard: SharedIpGuard, key: Key, rule: ProtectRule, host: str, client: str) -> None:
        self.guard = guard
        self.key = key  # (profile, member, rule name)
        self.rule = rule
        self.host = host
        self.client = client  # who a hold this request's answer starts is charged to
        self.address: str | None = None  # the origin's address once connected (None via a chained proxy)
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

    def moved(self, member: str, address: str | None = None) -> None:
        """Connected through ``member`` to the origin at ``address``: a failover to another
        member than the first counts there; a hold this request's answer starts covers
        that address too."""
        self.address = address
        if member != self.key[1] and self.live:
            self.guard.release(self.key)
            self.key = (self.key[0], member, self.key[2])
            self.guard.count(self.key)

    def answered(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """A forwarded response head (429 or 503): hold (member x host, member x address) if
        it says for how long."""
        self.guard.backoff(self, status, header(headers, b"retry-after"))


class SharedIpGuard:
    """``budget`` None: this process alone holds the budgets (exact, no leases). Else the
    guard admits from the slices it leased (``slots``, ``tokens``) and asks for more."""

    def __init__(self, clock: Callable[[], float], wall: Callable[[], float] = time.time,
                 budget: Budget | None = None) -> None:
        self._clock = clock
        self._wall = wall
        self.budget = budget
        self.slots: dict[Key, int] = {}  # concurrency slots leased (idle ones too)
        self.tokens: dict[Key, list] = {}  # [tokens leased, when they go back, rate]
        self.in_flight: dict[Key, int] = {}
        self.admitted: dict[Key, int] = {}
        self.refused: dict[tuple[str, str, str, str], int] = {}  # key + limit
        self.holds_started: dict[Key, int] = {}
        self._buckets: dict[Key, tuple[float, float]] = {}
        self.holds = HoldTable(clock)
        self.waiting = Waitlines(clock)  # the hold queue (protect[].queue)
        self.lines = self.waiting.lines  # key -> its line, while anyone waits there

    # --- admission --------------------------------------------------------------------------
    def admit(self, profile: str, member: str, rule: ProtectRule, host: str, client: str = "-",
              addresses: tuple[str, ...] | list[str] | None = None, turn: bool = False) -> Ticket:
        """Count one request or tunnel from ``client`` to ``host`` (to be dialed to one of
        ``addresses``) through ``member``, or raise ``OverBudget`` (429). ``turn``: the head
        of the key's hold queue is asking; anyone else queues behind those waiting."""
        key = (profile, member, rule.name)
        now = self._clock()
        if self.lines and not turn and key in self.lines:
            raise OverBudget(f"protect {rule.name} (profile {profile}, egress {member}): others wait for its budget",
                             key, rule, "queued", 0.0, "egress_queued")
        if self.holds:
            self._check_holds(key, rule, host, addresses, now)
        in_flight = self.in_flight.get(key, 0)
        limit = rule.max_concurrent
        if limit is not None and in_flight >= limit:
            self._refuse(key, rule, "concurrency", 1.0,
                         f"protect {rule.name} (profile {profile}, egress {member}): max_concurrent {limit} "
                         f"reached", "egress_concurrency_limit")
        rate = rule.max_per_second
        budget = self.budget
        if budget is not None:  # shared: admit from the slices leased, or ask for more
            if limit is not None and in_flight >= self.slots.get(key, 0):
                n = budget.try_slots(key, limit)
                if n:
                    self.slots[key] = self.slots.get(key, 0) + n
            lease = self.tokens.get(key) if rate is not None else None
            if rate is not None and (lease is None or lease[0] < 1 or lease[1] <= now):
                n = budget.try_tokens(key, rate)
                if n:
                    lease = self._leased_tokens(key, n, rate, now)
            need_slots = limit is not None and in_flight >= self.slots.get(key, 0)
            need_tokens = rate is not None and (lease is None or lease[0] < 1 or lease[1] <= now)
            if need_slots or need_tokens:
                raise LeaseNeeded(key, rule, need_slots, need_tokens)
            if lease is not None:
                lease[0] -= 1
        elif rate is not None:  # this process alone: one token bucket per key
            bucket = self._buckets.get(key)
            if bucket is None:
                tokens = rate if rate > 1.0 else 1.0  # (a full bucket: burst max(1, rate))
            else:
                tokens = bucket[0] + (now - bucket[1]) * rate
                if tokens > 1.0 and tokens > rate:
                    tokens = rate if rate > 1.0 else 1.0
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                self._refuse(key, rule, "rate", (1.0 - tokens) / rate,
                             f"protect {rule.name} (profile {profile}, egress {member}): max_per_second {rate:g} "
                             f"reached", "egress_rate_limit")
            self._buckets[key] = (tokens - 1.0, now)
        self.in_flight[key] = in_flight + 1
        self.admitted[key] = self.admitted.get(key, 0) + 1
        return Ticket(self, key, rule, host, client)

    def _leased_tokens(self, key: Key, n: int, rate: float, now: float) -> list:
        lease = self.tokens.get(key)
        if lease is not None and lease[1] <= now and lease[0] >= 1:  # (stale: they go back first)
            self.budget.give_back(key, 0, int(lease[0]), lease[2])
            lease = None
        if lease is None or lease[1] <= now:
            lease = self.tokens[key] = [0.0, now + TOKEN_TTL, rate]
        lease[0] += n
        return lease

    async def acquire(self, need: LeaseNeeded) -> None:
        """Lease what ``need`` lacks from the budget's owner, or raise ``LimitReached`` when
        the instance (or fleet) has none: every slot in use, no token left."""
        key, rule = need.key, need.rule
        profile, member = key[0], key[1]
        if need.slots and rule.max_concurrent is not None:
            n = await self.budget.slots(key, rule.max_concurrent)
            if n <= 0:
                self._refuse(key, rule, "concurrency", 1.0,
                             f"protect {rule.name} (profile {profile}, egress {member}): max_concurrent "
                             f"{rule.max_concurrent} reached", "egress_concurrency_limit")
            self.slots[key] = self.slots.get(key, 0) + n
        rate = rule.max_per_second
        if need.tokens and rate is not None:
            n, wait = await self.budget.tokens(key, rate)
            if n <= 0:
                self._refuse(key, rule, "rate", wait,
                             f"protect {rule.name} (profile {profile}, egress {member}): max_per_second {rate:g} "
                             f"reached", "egress_rate_limit")
            self._leased_tokens(key, n, rate, self._clock())

    def starved(self, need: LeaseNeeded) -> None:
        """Refuse a request whose slices other requests kept taking first (raises)."""
        key, rule = need.key, need.rule
        limit, what = ("concurrency", f"max_concurrent {rule.max_concurrent}") if need.slots else \
            ("rate", f"max_per_second {rule.max_per_second:g}")
        self._refuse(key, rule, limit, 1.0, f"protect {rule.name} (profile {key[0]}, egress {key[1]}): {what} reached",
                     "egress_concurrency_limit" if need.slots else "egress_rate_limit")

    def reclaim(self, key: Key) -> int:
        """The owner needs slots of ``key`` back: give up the idle ones (how many)."""
        leased = self.slots.get(key, 0)
        idle = leased - self.in_flight.get(key, 0)
        if idle <= 0:
            return 0
        self.slots[key] = leased - idle
        return idle

    def stale_tokens(self) -> list[tuple[Key, int, float]]:
        """Token slices kept past ``TOKEN_TTL``: taken back here, to be returned (key, n, rate)."""
        now = self._clock()
        stale = [(key, lease) for key, lease in self.tokens.items() if lease[1] <= now]
        for key, _ in stale:
            del self.tokens[key]
        return [(key, int(lease[0]), lease[2]) for key, lease in stale if lease[0] >= 1]

    def _check_holds(self, key: Key, rule: ProtectRule, host: str, addresses, now: float) -> None:
        holds = self.holds
        where, hold = host, holds.find((*key, host), now)
        if hold is None and addresses:
            for address in addresses:
                hold = holds.find((*key, address), now)
                if hold is not None:
                    where = address
                    break
        if hold is None:
            return
        left = hold.until - now
        said = hold.host if where == hold.host else f"{where} (as {hold.host})"
        self._refuse(key, rule, "hold", left,
                     f"protect {rule.name} (profile {key[0]}, egress {key[1]}): {said} answered "
                     f"{hold.status} with Retry-After; held for {left:.0f}s more", "origin_backoff")

    def _refuse(self, key: Key, rule: ProtectRule, limit: str, wait: float, detail: str, reason: str) -> None:
        over = OverBudget(detail, key, rule, limit, wait, reason)
        if rule.max_wait is None:  # (a queued one is counted if its wait ends in the 429: ``refuse``)
            self.refuse(over)
        raise over

    def refuse(self, over: OverBudget) -> OverBudget:
        """Count ``over`` as answered with 429 (``refused``, by the limit that stopped it)."""
        rkey = (*over.key, over.limit)
        self.refused[rkey] = self.refused.get(rkey, 0) + 1
        return over

    def count(self, key: Key) -> None:
        self.in_flight[key] = self.in_flight.get(key, 0) + 1

    def release(self, key: Key) -> None:
        n = self.in_flight.get(key, 0)
        self.in_flight[key] = n - 1 if n > 0 else 0  # (kept at 0: the gauge stays exported)
        if self.lines:  # the hold queue's head for this key tries again now
            self.waiting.poke(key)

    # --- holds --------------------------------------------------------------------------------
    def hold_on(self, profile: str, member: str, host: str) -> tuple[float, str] | None:
        """(seconds left, why) while the gateway holds ``member`` of ``profile`` for ``host``
        (an origin's Retry-After), else None. Read only: provider checks ask before going out."""
        if not self.holds:
            return None
        now = self._clock()
        hold = next((h for h in self.holds.live(profile) if h.member == member and host in (h.host, h.address)),
                    None)
        if hold is None:
            return None
        return hold.until - now, f"protect {hold.rule}: {host} answered {hold.status} with Retry-After"

    def backoff(self, ticket: Ticket, status: int, retry_after: bytes | None) -> None:
        rule = ticket.rule
        seconds = hold_seconds(rule, status, retry_after, self._wall())
        if seconds is None:
            return
        profile, member = ticket.profile, ticket.member
        hold = self.holds.add(profile, member, rule.name, ticket.client, ticket.host, ticket.address, status,
                              seconds, rule.max_holds, rule.max_holds_per_client)
        if hold is None:
            log_event("protect_hold_dropped", profile=profile, member=member, host=ticket.host[:255],
                      rule=rule.name, client=ticket.client, status=status, seconds=round(seconds, 3),
                      why=f"rule {rule.name} holds max_holds {rule.max_holds} of other clients")
            return
        key = ticket.key
        self.holds_started[key] = self.holds_started.get(key, 0) + 1
        log_event("protect_hold", profile=profile, member=member, host=ticket.host[:255],
                  address=ticket.address, rule=rule.name, client=ticket.client, status=status,
                  seconds=round(seconds, 3))
        if self.budget is not None:  # every other worker (and instance) holds it too
            self.budget.hold_learned({
                "profile": profile, "member": member, "rule": rule.name, "client": ticket.client,
                "host": ticket.host, "address": ticket.address, "status": status, "seconds": seconds,
                "max_holds": rule.max_holds, "max_holds_per_client": rule.max_holds_per_client})

    def apply_hold(self, doc: dict) -> bool:
        """A hold learned elsewhere (another worker or instance: ``hold_learned`` there), with
        the seconds it had left when sent. False if it is not well-formed."""
        try:
            texts = [doc[k] for k in ("profile", "member", "rule", "client", "host")]
            address, status, seconds = doc.get("address"), int(doc["status"]), float(doc["seconds"])
            bounds = int(doc["max_holds"]), int(doc["max_holds_per_client"])
        except (KeyError, TypeError, ValueError):
            return False
        if not all(isinstance(t, str) for t in texts) or not (address is None or isinstance(address, str)) \
                or not 0 < seconds < 1e7 or min(bounds) < 1:
            return False
        profile, member, rule, client, host = texts
        self.holds.add(profile, member, rule, client, host[:255], address, status, seconds, *bounds)
        return True

    # --- what status, whoami and metrics show --------------------------------------------------
    def current_holds(self, profile: str | None = None) -> list[dict]:
        now = self._clock()
        live = self.holds.live(profile)
        live.sort(key=_ends)
        return [h.describe(now) for h in live[:HOLDS_SHOWN]]

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
        held: dict[Key, int] = {}
        for h in self.holds.live():
            key = (h.profile, h.member, h.rule)
            held[key] = held.get(key, 0) + 1
        waiting = self.waiting
        return {"admitted": dict(self.admitted), "refused": dict(self.refused), "in_flight": dict(self.in_flight),
                "holds_started": dict(self.holds_started), "held": held, "holds_dropped": dict(self.holds.dropped),
                "queued": waiting.queued(), "queue_outcomes": dict(waiting.outcomes),
                "queue_waited": {key: list(h) for key, h in waiting.waited.items()}}


def admit_route(guard: SharedIpGuard, protect: dict[str, ProfileProtect], r: Route, rec: AccessRecord,
                turn: bool = False) -> None:
    """The hook once a route's addresses are judged (``r.ready``): admit ``r`` if its
    destination is under one of its profile's rules (the ticket goes on ``rec``), else do
    nothing. Raises ``OverBudget`` (429, or a wait in the hold queue: ``dispatch``)."""
    rules = protect.get(r.pool.name)
    if rules is None or not r.plans:
        return
    rule = rules.match(r.dest)
    if rule is not None:
        member = r.plans[0].label
        try:
            rec.protect = guard.admit(r.pool.name, member, rule, r.dest.host, rec.client, r.addresses, turn)
        except LimitReached:  # the record says which member hit which rule's limit
            rec.egress_addr = member
            rec.extra = {**(rec.extra or {}), "protect_rule": rule.name}
            raise


def _ends(hold: Hold) -> float:
    return hold.until
