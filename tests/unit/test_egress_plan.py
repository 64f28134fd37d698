"""egress/plan.py: member order (sticky / round-robin), down-marking, build_pool."""

from __future__ import annotations

import pytest

from egressgate.config.schema import ProfileConfig
from egressgate.egress.plan import EgressPlan, ProfilePool, build_pool
from egressgate.model import UpstreamProxy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pool(n: int = 3, sticky: bool = True, clock: Clock | None = None) -> ProfilePool:
    members = [EgressPlan("p", "bind", source=f"10.0.0.{i + 1}") for i in range(n)]
    return ProfilePool("p", "bind", members, (), sticky, 5.0, clock or Clock(), retry_after=30.0)


def sources(plans: list[EgressPlan]) -> list[str | None]:
    return [p.source for p in plans]


def is_rotation(seq: list, base: list) -> bool:
    return len(seq) == len(base) and any(seq == base[i:] + base[:i] for i in range(len(base)))


def test_single_member_is_always_first() -> None:
    p = pool(1)
    assert sources(p.plans("a")) == ["10.0.0.1"]
    p.mark_down(p.members[0])
    assert sources(p.plans("a")) == ["10.0.0.1"]  # nothing else to try


def test_sticky_same_client_same_order() -> None:
    p = pool(3, sticky=True)
    first = p.plans("job-a")
    for _ in range(5):
        assert p.plans("job-a") == first
    assert is_rotation(sources(first), ["10.0.0.1", "10.0.0.2", "10.0.0.3"])


def test_sticky_spreads_clients_over_members() -> None:
    p = pool(3, sticky=True)
    firsts = {p.plans(f"job-{i}")[0].source for i in range(50)}
    assert firsts == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}


def test_sticky_is_stable_across_pool_instances() -> None:
    # crc32, not hash(): the same client keeps its source across restarts and replicas
    assert pool(3).plans("job-a") == pool(3).plans("job-a")


def test_round_robin_rotates() -> None:
    p = pool(3, sticky=False)
    got = [sources(p.plans("job-a")) for _ in range(4)]
    assert got == [
        ["10.0.0.1", "10.0.0.2", "10.0.0.3"],
        ["10.0.0.2", "10.0.0.3", "10.0.0.1"],
        ["10.0.0.3", "10.0.0.1", "10.0.0.2"],
        ["10.0.0.1", "10.0.0.2", "10.0.0.3"],
    ]


@pytest.mark.parametrize("sticky", [True, False])
def test_down_member_goes_last_until_retry_after(sticky: bool) -> None:
    clock = Clock()
    p = pool(3, sticky=sticky, clock=clock)
    order = sources(p.plans("job-a")) if sticky else ["10.0.0.2", "10.0.0.3", "10.0.0.1"]
    first = next(m for m in p.members if m.source == order[0])
    p.mark_down(first)
    assert p.is_down(first)
    got = sources(p.plans("job-a"))
    assert got[-1] == first.source
    assert sorted(got) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]  # still tried, last
    clock.now += 29.0
    assert p.is_down(first)
    assert sources(p.plans("job-a"))[-1] == first.source
    clock.now += 1.5
    assert not p.is_down(first)
    if sticky:
        assert sources(p.plans("job-a")) == order


def test_mark_up_restores_order_at_once() -> None:
    p = pool(3)
    order = p.plans("job-a")
    p.mark_down(order[0])
    assert p.plans("job-a")[0] != order[0]
    p.mark_up(order[0])
    assert not p.is_down(order[0])
    assert p.plans("job-a") == order


def test_all_down_keeps_rotation_order() -> None:
    p = pool(3)
    order = p.plans("job-a")
    for m in p.members:
        p.mark_down(m)
    assert p.plans("job-a") == order


def test_ip_matches() -> None:
    plan = EgressPlan("x", "bind", source="10.0.0.1")
    p = ProfilePool("x", "bind", [plan], ("203.0.113.10",), True, 5.0, Clock())
    assert p.ip_matches is None
    p.record(plan, "203.0.113.10", None, 1.0)
    assert p.ip_matches is True
    p.record(plan, "203.0.113.11", None, 2.0)
    assert p.ip_matches is False
    q = pool(1)
    q.record(q.members[0], "203.0.113.10", None, 1.0)
    assert q.ip_matches is None  # nothing expected


def _attested(n: int = 2) -> ProfilePool:
    members = [EgressPlan("x", "bind", source=f"10.0.0.{i + 1}") for i in range(n)]
    return ProfilePool("x", "bind", members, ("203.0.113.10",), False, 5.0, Clock(), attest=True)


ATTESTATION = [
    # (observations per member: (observed, error) or None for not yet checked, usable members, reason)
    ("never checked", [None, None], [], "egress_ip_unverified"),
    ("both verified", [("203.0.113.10", None), ("203.0.113.10", None)], ["10.0.0.1", "10.0.0.2"], None),
    ("one wrong IP", [("203.0.113.10", None), ("198.51.100.9", None)], ["10.0.0.1"], None),
    ("one check failed", [("203.0.113.10", None), (None, "timed out")], ["10.0.0.1"], None),
    ("all wrong", [("198.51.100.9", None), ("198.51.100.9", None)], [], "egress_ip_mismatch"),
    ("wrong and failed", [(None, "refused"), ("198.51.100.9", None)], [], "egress_ip_mismatch"),
    ("all failed", [(None, "refused"), (None, "timed out")], [], "egress_ip_unverified"),
]


@pytest.mark.parametrize(("label", "seen", "usable", "reason"), ATTESTATION, ids=[a[0] for a in ATTESTATION])
def test_attestation_fails_closed_per_member(label, seen, usable, reason) -> None:
    p = _attested()
    for plan, obs in zip(p.members, seen, strict=True):
        if obs is not None:
            p.record(plan, obs[0], obs[1], 1.0)
    assert sorted(m.source for m in p.plans("job")) == usable
    assert p.healthy is (reason is None)
    refusal = p.refusal()
    assert (refusal[0] if refusal else None) == reason
    if reason == "egress_ip_mismatch":
        assert "198.51.100.9 is not one of [203.0.113.10]" in refusal[1]


def test_attestation_recovers_and_survives_a_reload() -> None:
    p = _attested(1)
    p.record(p.members[0], "198.51.100.9", None, 1.0)
    assert not p.healthy
    p.record(p.members[0], "203.0.113.10", None, 2.0)
    assert p.healthy and p.plans("job") == p.members
    moved = ProfilePool("x", "bind", [p.members[0], EgressPlan("x", "bind", source="10.0.0.9")],
                        ("203.0.113.10",), False, 5.0, Clock(), attest=True)
    moved.adopt(p)
    assert moved.plans("job") == [p.members[0]]  # the new member waits for its own check
    assert moved.unchecked() == [moved.members[1]]


def test_profiles_without_expect_ip_are_never_attested() -> None:
    p = ProfilePool("d", "direct", [EgressPlan("d", "direct")], (), True, 5.0, Clock(), attest=True)
    assert p.healthy and p.plans("job") == p.members and p.refusal() is None


def test_plan_key() -> None:
    up = UpstreamProxy.parse("http://u:p@proxy.example:3128")
    assert EgressPlan("a", "direct").key == ("direct", None, None)
    assert EgressPlan("a", "bind", source="10.0.0.1").key == EgressPlan("b", "bind", source="10.0.0.1").key
    assert EgressPlan("a", "upstream", upstream=up).key == ("upstream", None, "http://proxy.example:3128")


class LocalAddresses:
    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls: list[str] = []

    def __call__(self, cidr: str) -> list[str]:
        self.calls.append(cidr)
        return self.table.get(cidr, [])


def test_build_pool_bind_with_cidr_entries() -> None:
    spec = ProfileConfig(bind=["10.0.1.5", "10.0.2.0/24", "10.0.3.7"], expect_ip=["203.0.113.10"],
                         pick="round_robin", connect_timeout="2s")
    local = LocalAddresses({"10.0.2.0/24": ["10.0.2.4", "10.0.2.9"]})
    p = build_pool("vendor-x", spec, local, 10.0, Clock())
    assert local.calls == ["10.0.2.0/24"]  # plain addresses are not looked up
    assert sources(p.members) == ["10.0.1.5", "10.0.2.4", "10.0.2.9", "10.0.3.7"]
    assert all(m.kind == "bind" and m.profile == "vendor-x" for m in p.members)
    assert p.kind == "bind"
    assert p.expect_ip == ("203.0.113.10",)
    assert p.pick == "round_robin"
    assert p.connect_timeout == 2.0


def test_build_pool_bind_cidr_without_local_address_falls_back_to_an_address() -> None:
    spec = ProfileConfig(bind=["10.0.9.0/24"])
    p = build_pool("x", spec, LocalAddresses({}), 10.0, Clock())
    assert len(p.members) == 1
    assert p.members[0].source == "10.0.9.0"


def test_build_pool_upstream() -> None:
    spec = ProfileConfig(upstream=["http://a.example:3128", "http://u:p@b.example:8080"])
    p = build_pool("vendor-y", spec, LocalAddresses({}), 7.0, Clock())
    assert p.kind == "upstream"
    assert [str(m.upstream) for m in p.members] == ["http://a.example:3128", "http://b.example:8080"]
    assert p.members[0].upstream.authorization is None
    assert p.members[1].upstream.authorization == "Basic dTpw"
    assert p.pick == "failover"  # upstream proxies: tried in the listed order for every client
    assert [str(m.upstream) for m in p.plans("any-client")] == ["http://a.example:3128", "http://b.example:8080"]
    assert p.connect_timeout == 7.0


def test_build_pool_direct() -> None:
    p = build_pool("default", ProfileConfig(direct={}), LocalAddresses({}), 10.0, Clock())
    assert p.kind == "direct"
    assert p.members == [EgressPlan("default", "direct")]
    assert p.plans("anyone") == [EgressPlan("default", "direct")]
