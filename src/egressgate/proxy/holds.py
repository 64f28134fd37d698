"""Shared-IP holds, the table: which (egress member x origin) an origin's ``Retry-After``
asked to wait, bounded so that no client can lift a hold another client's traffic caused.

Keys. A hold is found by ``(profile, member, rule, where)`` where ``where`` is the host as the
client spelled it *and* the address the gateway was connected to when the origin answered (a
forwarded request through a chained proxy knows only the name). A request under the same
rule is held when its name or any address it would be dialed to is held: the same origin
reached by its IP literal or by another name that resolves to the same address is held too.
(A name or IP literal that no pattern of the rule covers is not protected at all; list the
provider's addresses in the rule, e.g. its CIDR, to cover its IP literals.)

Bounds, per (profile, rule): at most ``max_holds`` holds, and at most
``max_holds_per_client`` caused by any one client (the client whose request got the answer).

- A client whose share is full replaces its own hold that ends soonest; never another's.
- When the rule's table is full, expired holds are swept; if it is still full, the client
  replaces its own hold that ends soonest, or -- holding none -- its new hold is not recorded.
  A hold is never evicted by a client that did not cause it. Both cases are counted
  (``dropped``: ``client_share`` / ``rule_full``).
- A key already held by a live hold is not taken over: that hold lasts until the later of
  both ends (a hold is never shortened), and the new hold keeps only the keys it adds.

Expired holds leave when they are looked up, swept, or when their share needs room.
"""

from __future__ import annotations

from collections.abc import Callable

Where = tuple[str, str, str, str]  # (profile, member, rule, host name or address)
SWEEP_EVERY = 1.0  # a full rule's table looks for expired holds at most this often (seconds)


class Hold:
    __slots__ = ("until", "profile", "member", "rule", "client", "host", "address", "status", "seconds", "keys")

    def __init__(self, until: float, profile: str, member: str, rule: str, client: str, host: str,
                 address: str | None, status: int, seconds: float) -> None:
        self.until = until
        self.profile = profile
        self.member = member
        self.rule = rule
        self.client = client  # who caused it: the only client whose new holds may replace it
        self.host = host
        self.address = address
        self.status = status
        self.seconds = seconds
        self.keys: list[Where] = []

    def describe(self, now: float) -> dict:
        return {"profile": self.profile, "member": self.member, "host": self.host, "address": self.address,
                "rule": self.rule, "status": self.status, "remaining_seconds": round(self.until - now, 3)}


class _RuleHolds:
    """One (profile, rule)'s holds, by the client that caused them (insertion order)."""

    __slots__ = ("count", "by_client", "swept")

    def __init__(self) -> None:
        self.count = 0
        self.by_client: dict[str, dict[Hold, None]] = {}
        self.swept = float("-inf")


class HoldTable:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.held: dict[Where, Hold] = {}
        self._rules: dict[tuple[str, str], _RuleHolds] = {}
        self.dropped: dict[tuple[str, str, str, str], int] = {}  # (profile, member, rule, why)

    def __len__(self) -> int:
        return sum(r.count for r in self._rules.values())

    def __bool__(self) -> bool:
        return bool(self.held)

    # --- lookups ----------------------------------------------------------------------------
    def find(self, where: Where, now: float) -> Hold | None:
        """The live hold on ``where``, if any (an expired one is removed on the way)."""
        hold = self.held.get(where)
        if hold is None:
            return None
        if hold.until > now:
            return hold
        self._remove(hold)
        return None

    def live(self, profile: str | None = None) -> list[Hold]:
        now = self._clock()
        return [h for (p, _), r in list(self._rules.items()) if profile is None or p == profile
                for share in list(r.by_client.values()) for h in list(share) if h.until > now]

    # --- learning ---------------------------------------------------------------------------
    def add(self, profile: str, member: str, rule: str, client: str, host: str, address: str | None,
            status: int, seconds: float, max_holds: int, max_per_client: int) -> Hold | None:
        """Record a hold; the hold now in force (a live one extended), or None when the rule's
        table is full and ``client`` holds nothing there it could replace."""
        now = self._clock()
        until = now + seconds
        wanted = [(profile, member, rule, host)]
        if address is not None and address != host:
            wanted.append((profile, member, rule, address))
        keys: list[Where] = []
        found: Hold | None = None
        for where in wanted:
            existing = self.find(where, now)
            if existing is None:
                keys.append(where)
            else:  # never shortened, never taken over
                if until > existing.until:
                    existing.until, existing.status, existing.seconds = until, status, seconds
                found = found or existing
        if not keys:
            return found
        table = self._rules.get((profile, rule))
        if table is None:
            table = self._rules[(profile, rule)] = _RuleHolds()
        share = table.by_client.get(client)
        if share is not None and len(share) >= max_per_client:
            self._drop_expired(share, now)
            if len(share) >= max_per_client:
                self._remove(min(share, key=_ends))
                self._count_drop(profile, member, rule, "client_share")
        if table.count >= max_holds:
            if now - table.swept >= SWEEP_EVERY:
                table.swept = now
                for own in list(table.by_client.values()):
                    self._drop_expired(own, now)
            if table.count >= max_holds:
                if not share:
                    self._count_drop(profile, member, rule, "rule_full")
                    return found
                self._remove(min(share, key=_ends))
                self._count_drop(profile, member, rule, "rule_full")
        hold = Hold(until, profile, member, rule, client, host, address, status, seconds)
        hold.keys = keys
        for where in keys:
            self.held[where] = hold
        table = self._rules.get((profile, rule))  # (a removal above may have emptied it)
        if table is None:
            table = self._rules[(profile, rule)] = _RuleHolds()
        table.by_client.setdefault(client, {})[hold] = None
        table.count += 1
        return hold

    # --- removal ----------------------------------------------------------------------------
    def _drop_expired(self, share: dict[Hold, None], now: float) -> None:
        for hold in [h for h in share if h.until <= now]:
            self._remove(hold)

    def _remove(self, hold: Hold) -> None:
        for where in hold.keys:
            if self.held.get(where) is hold:
                del self.held[where]
        table = self._rules.get((hold.profile, hold.rule))
        if table is None:
            return
        share = table.by_client.get(hold.client)
        if share is not None and hold in share:
            del share[hold]
            table.count -= 1
            if not share:
                del table.by_client[hold.client]
            if not table.count:
                del self._rules[(hold.profile, hold.rule)]

    def _count_drop(self, profile: str, member: str, rule: str, why: str) -> None:
        key = (profile, member, rule, why)
        self.dropped[key] = self.dropped.get(key, 0) + 1


def _ends(hold: Hold) -> float:
    return hold.until
