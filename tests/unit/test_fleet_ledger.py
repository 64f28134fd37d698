"""The owner's accounts of shared budgets (fleet.ledger) and a guard that leases from them
(proxy.protect with a budget): pure, with an injected clock."""

from __future__ import annotations

import asyncio

import pytest

from egressgate.errors import LimitReached
from egressgate.fleet import wire
from egressgate.fleet.ledger import TOKEN_TTL, Ledger, slice_of
from egressgate.policy.protect import ProtectRule
from egressgate.proxy.protect import LeaseNeeded, SharedIpGuard

K = ("p", "m", "r")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_slots_never_sum_past_the_limit_and_come_back() -> None:
    ledger = Ledger(Clock())
    assert [ledger.grant_slots(h, K, 3, 1) for h in (0, 1, 1, 2, 0)] == [1, 1, 1, 0, 0]
    assert ledger.leased(K) == 3 and ledger.holders(K, besides=0) == [1]
    ledger.return_slots(1, K, 1)
    assert ledger.grant_slots(2, K, 3, 5) == 1  # (only what is free)
    assert ledger.drop(1) == 1  # a worker gone: its slot comes back
    assert ledger.grant_slots(0, K, 3, 1) == 1 and ledger.leased(K) == 3
    assert ledger.grant_slots(0, K, 2, 1) == 0  # a lowered limit grants nothing until slots return


def test_tokens_come_from_one_bucket_and_unspent_ones_go_back_capped() -> None:
    clock = Clock()
    ledger = Ledger(clock)
    assert ledger.grant_tokens(K, 20.0, slice_of(20.0)) == (2, 0.0)  # a slice: 0.1 s of the rate
    for _ in range(9):
        ledger.grant_tokens(K, 20.0, 2)
    n, wait = ledger.grant_tokens(K, 20.0, 2)
    assert n == 0 and wait == pytest.approx(0.05)  # the burst (20) is spent
    clock.now += 0.15
    assert ledger.grant_tokens(K, 20.0, 2) == (2, 0.0)
    ledger.return_tokens(K, 20.0, 1000)
    assert ledger.grant_tokens(K, 20.0, 1000)[0] == 20  # capped at the burst
    slow = ("p", "m", "slow")
    assert ledger.grant_tokens(slow, 0.01, 1) == (1, 0.0)
    assert ledger.grant_tokens(slow, 0.01, 1)[1] == pytest.approx(100.0)


class FakeBudget:
    """The owner as a guard sees it, answering from a ledger (holder ``who``)."""

    def __init__(self, ledger: Ledger, who: int, sync: bool) -> None:
        self.ledger, self.who, self.sync = ledger, who, sync
        self.holds: list[dict] = []

    def try_slots(self, key, limit):
        return self.ledger.grant_slots(self.who, key, limit, 1) if self.sync else 0

    async def slots(self, key, limit):
        return self.ledger.grant_slots(self.who, key, limit, 1)

    def try_tokens(self, key, rate):
        return self.ledger.grant_tokens(key, rate, slice_of(rate))[0] if self.sync else 0

    async def tokens(self, key, rate):
        return self.ledger.grant_tokens(key, rate, slice_of(rate))

    def give_back(self, key, slots, tokens, rate):
        self.ledger.return_slots(self.who, key, slots)
        if tokens:
            self.ledger.return_tokens(key, rate, tokens)

    def hold_learned(self, doc):
        self.holds.append(doc)


def _admit(g: SharedIpGuard, rule: ProtectRule):
    """Admit as the dispatcher does: at once, or after leasing what is lacking."""
    try:
        return g.admit("p", "m", rule, "h")
    except LeaseNeeded as need:
        asyncio.run(g.acquire(need))
        return g.admit("p", "m", rule, "h")


def test_two_leasing_guards_never_admit_past_max_concurrent_together() -> None:
    clock = Clock()
    ledger = Ledger(clock)
    rule = ProtectRule("r", ("h",), 3, None, 300.0)
    a = SharedIpGuard(clock, budget=FakeBudget(ledger, 0, sync=True))
    b = SharedIpGuard(clock, budget=FakeBudget(ledger, 1, sync=False))
    tickets = [_admit(a, rule), _admit(b, rule), _admit(b, rule)]
    with pytest.raises(LeaseNeeded):  # b's slices are in use: it must ask ...
        b.admit("p", "m", rule, "h")
    with pytest.raises(LimitReached):  # ... and the owner has none left
        _admit(a, rule)
    tickets[0].release()  # a keeps its idle slot until the owner reclaims it
    assert ledger.slots_of(0, K[:2] + ("r",)) == 1
    assert a.reclaim(("p", "m", "r")) == 1 and a.reclaim(("p", "m", "r")) == 0
    ledger.return_slots(0, ("p", "m", "r"), 1)
    tickets.append(_admit(b, rule))
    assert b.in_flight[("p", "m", "r")] == 3 and ledger.leased(("p", "m", "r")) == 3


def test_a_leasing_guard_spends_token_slices_and_gives_stale_ones_back() -> None:
    clock = Clock()
    ledger = Ledger(clock)
    rule = ProtectRule("r", ("h",), None, 20.0, 300.0)
    g = SharedIpGuard(clock, budget=FakeBudget(ledger, 1, sync=False))
    _admit(g, rule)  # leased a slice of 2, spent 1
    g.admit("p", "m", rule, "h")  # the second from the same slice: no lease
    with pytest.raises(LeaseNeeded):
        g.admit("p", "m", rule, "h")
    _admit(g, rule)
    clock.now += TOKEN_TTL
    assert g.stale_tokens() == [(("p", "m", "r"), 1, 20.0)]
    assert g.stale_tokens() == []


def test_a_hold_learned_is_passed_on_and_one_from_elsewhere_is_applied() -> None:
    clock = Clock()
    budget = FakeBudget(Ledger(clock), 0, sync=True)
    rule = ProtectRule("r", ("h",), None, None, 300.0)
    g = SharedIpGuard(clock, lambda: 0.0, budget=budget)
    g.admit("p", "m", rule, "h", "job").answered(429, [(b"retry-after", b"60")])
    doc = budget.holds[0]
    assert (doc["host"], doc["client"], doc["seconds"]) == ("h", "job", 60.0)
    other = SharedIpGuard(clock)
    assert other.apply_hold(doc)
    with pytest.raises(LimitReached):
        other.admit("p", "m", rule, "h")
    for bad in ({}, {**doc, "seconds": -1}, {**doc, "host": 5}, {**doc, "max_holds": 0}, {**doc, "status": "x"}):
        assert not other.apply_hold(bad)


@pytest.mark.parametrize("line, ok", [
    (b'{"op":"slots"}', True), (b"[1]", False), (b"not json", False), (b"\xff", False),
])
def test_wire_lines(line, ok) -> None:
    assert (wire.decode(line) is not None) == ok
    assert wire.key(["a", "b", "c"]) == ("a", "b", "c") and wire.key(["a", 1, "c"]) is None
    assert wire.count(True) is None and wire.count(-1) is None and wire.count(3) == 3
    assert wire.number(float("nan")) is None and wire.number(0.5) == 0.5
