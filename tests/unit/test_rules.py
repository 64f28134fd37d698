"""policy/rules.py: compiled destination matchers (exact, ``*.suffix``, CIDR, ports)."""

from __future__ import annotations

import pytest

from egressgate.model import HostPort
from egressgate.policy.rules import RuleSet


def match(patterns: list[str], authority: str) -> str | None:
    dest = HostPort.parse_authority(authority)
    return RuleSet(patterns).match(dest.host, dest.port, dest.is_ip)


CASES = [
    # (patterns, destination, rule that matches or None)
    (["example.com"], "example.com:443", "example.com"),
    (["example.com"], "EXAMPLE.com.:443", "example.com"),
    (["example.com"], "www.example.com:443", None),
    (["example.com"], "notexample.com:443", None),
    (["example.com"], "example.com.evil.net:443", None),
    (["*.example.com"], "a.example.com:443", "*.example.com"),
    (["*.example.com"], "a.b.example.com:443", "*.example.com"),
    (["*.example.com"], "example.com:443", None),  # the apex is not a subdomain
    (["*.example.com"], "badexample.com:443", None),
    (["*.example.com"], "example.com.evil.net:443", None),
    (["*.example.com", "example.com"], "example.com:443", "example.com"),
    (["example.com:8443"], "example.com:8443", "example.com:8443"),
    (["example.com:8443"], "example.com:443", None),
    (["*.example.com:443"], "a.example.com:443", "*.example.com:443"),
    (["*.example.com:443"], "a.example.com:80", None),
    (["example.com:8443", "example.com"], "example.com:443", "example.com"),
    (["example.com", "example.com:8443"], "example.com:8443", "example.com:8443"),  # port-specific wins
    (["*"], "anything.example:1", "*"),
    (["*"], "192.0.2.1:1", "*"),
    (["*:443"], "anything.example:443", "*:443"),
    (["*:443"], "anything.example:80", None),
    (["203.0.113.0/24"], "203.0.113.7:443", "203.0.113.0/24"),
    (["203.0.113.0/24"], "203.0.114.7:443", None),
    (["203.0.113.0/24:443"], "203.0.113.7:443", "203.0.113.0/24:443"),
    (["203.0.113.0/24:443"], "203.0.113.7:80", None),
    (["203.0.113.7"], "203.0.113.7:80", "203.0.113.7"),
    (["203.0.113.7"], "203.0.113.8:80", None),
    (["[2001:db8::/32]:443"], "[2001:db8::1]:443", "[2001:db8::/32]:443"),
    (["2001:db8::/32"], "[2001:db9::1]:443", None),
    (["203.0.113.0/24"], "[2001:db8::1]:443", None),  # family mismatch
    (["example.com"], "203.0.113.7:443", None),  # names never match IP literals
    (["203.0.113.0/24"], "example.com:443", None),  # and CIDRs never match names
    ([], "example.com:443", None),
]


@pytest.mark.parametrize(("patterns", "dest", "rule"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_match(patterns: list[str], dest: str, rule: str | None) -> None:
    assert match(patterns, dest) == rule


def test_ports_and_empty() -> None:
    rs = RuleSet(["a.example:8443", "*.b.example", "*:22", "10.0.0.0/8:5432"])
    assert rs.ports == frozenset({8443, 22, 5432})
    assert not rs.empty
    assert RuleSet([]).empty
    assert RuleSet([]).ports == frozenset()


def test_bad_pattern_raises() -> None:
    with pytest.raises(ValueError):
        RuleSet(["ok.example", "foo.*.example"])


def test_match_ip_direct() -> None:
    rs = RuleSet(["10.0.0.0/8:5432", "192.0.2.0/24"])
    assert rs.match_ip("10.1.2.3", 5432) == "10.0.0.0/8:5432"
    assert rs.match_ip("10.1.2.3", 5433) is None
    assert rs.match_ip("192.0.2.200", 1) == "192.0.2.0/24"
    assert RuleSet(["example.com"]).match_ip("10.0.0.1", 1) is None


@pytest.mark.parametrize("address", ["::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_ipv4_cidr_rule_matches_ipv6_forms_of_the_address(address: str) -> None:
    rs = RuleSet(["8.8.8.0/24"])
    assert rs.match_ip(address, 443) == "8.8.8.0/24"


def test_thousand_rules_match_correctly() -> None:
    patterns = [f"host{i}.example.com" for i in range(400)]
    patterns += [f"*.zone{i}.example.net" for i in range(300)]
    patterns += [f"svc{i}.example.org:{8000 + i}" for i in range(200)]
    patterns += [f"10.{i // 256}.{i % 256}.0/24" for i in range(100)]
    assert len(patterns) == 1000
    rs = RuleSet(patterns)
    cases = [
        ("host0.example.com", 443, False, "host0.example.com"),
        ("host399.example.com", 443, False, "host399.example.com"),
        ("host400.example.com", 443, False, None),
        ("a.b.zone299.example.net", 443, False, "*.zone299.example.net"),
        ("zone299.example.net", 443, False, None),
        ("svc199.example.org", 8199, False, "svc199.example.org:8199"),
        ("svc199.example.org", 8198, False, None),
        ("10.0.99.5", 1, True, "10.0.99.0/24"),
        ("10.0.100.5", 1, True, None),
    ]
    for host, port, is_ip, rule in cases:
        assert rs.match(host, port, is_ip) == rule, host
    # that lookups stay fast as the rules grow (by label, not by scanning) is measured by
    # bench/rules_lookup.py: a wall-clock bound here would fail on a loaded machine
