"""Property tests (hypothesis) for host normalisation and destination rule matching."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egressgate.errors import ClientProtocolError
from egressgate.model import HostPort, normalize_host
from egressgate.policy.guard import AddressGuard
from egressgate.policy.rules import RuleSet

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
hostname = st.lists(label, min_size=2, max_size=4).map(".".join).filter(
    lambda h: not all(p.isdigit() for p in h.split(".")))


@SETTINGS
@given(hostname, st.sampled_from(["", "."]), st.booleans())
def test_normalisation_is_idempotent_and_case_insensitive(host, dot, upper):
    shown = (host.upper() if upper else host) + dot
    norm = normalize_host(shown)
    assert norm == host
    assert normalize_host(norm) == norm


@SETTINGS
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_integer_and_dotted_shorthand_hosts_are_refused(n):
    ip = ipaddress.IPv4Address(n)
    a, b, c, d = ip.packed
    for form in (str(n), hex(n), f"{a}.{(b << 16) | (c << 8) | d}", f"0{a:o}.{b}.{c}.{d}" if a else f"0.{b}.{c}.{d}x"):
        if form.endswith("x"):
            continue
        try:
            normalize_host(form)
        except ClientProtocolError:
            continue
        # the only accepted numeric spelling is the canonical dotted quad
        assert form == str(ip)


@SETTINGS
@given(st.ip_addresses(v=4))
def test_ipv4_mapped_and_nat64_forms_are_judged_like_the_ipv4_address(ip):
    guard = AddressGuard()
    verdict = guard.check(str(ip))
    mapped = ipaddress.IPv6Address("::ffff:" + str(ip))
    nat64 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(ip))
    assert (guard.check(str(mapped)) is None) == (verdict is None)
    assert (guard.check(str(nat64)) is None) == (verdict is None)


@SETTINGS
@given(hostname, label)
def test_wildcard_matches_exactly_the_subdomains(domain, sub):
    rules = RuleSet([f"*.{domain}"])
    assert rules.match(f"{sub}.{domain}", 443, False) == f"*.{domain}"
    assert rules.match(domain, 443, False) is None
    assert rules.match(f"{sub}{domain}", 443, False) is None  # no dot: a look-alike, not a subdomain
    trick = f"{domain}.{sub}"  # the domain followed by more labels
    if not trick.endswith("." + domain):
        assert rules.match(trick, 443, False) is None


@SETTINGS
@given(st.lists(hostname, min_size=1, max_size=30, unique=True), hostname, st.integers(1, 65535))
def test_exact_rules_match_only_listed_hosts(listed, other, port):
    rules = RuleSet(listed)
    for host in listed:
        assert rules.match(host, port, False) == host
    if other not in listed:
        assert rules.match(other, port, False) is None


@SETTINGS
@given(hostname, st.integers(1, 65535), st.integers(1, 65535))
def test_port_rules(host, port, other):
    rules = RuleSet([f"{host}:{port}"])
    assert rules.match(host, port, False) == f"{host}:{port}"
    if other != port:
        assert rules.match(host, other, False) is None


@SETTINGS
@given(st.ip_addresses(v=4), st.integers(8, 32), st.ip_addresses(v=4))
def test_cidr_rules_agree_with_ipaddress(base, prefix, ip):
    net = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
    rules = RuleSet([str(net)])
    assert (rules.match(str(ip), 443, True) is not None) == (ip in net)


@pytest.mark.parametrize("text", ["example.com:0", "[::1]", "exa mple.com:80", "a..b:80", "-a.com:80"])
def test_bad_authorities(text):
    with pytest.raises(ClientProtocolError):
        HostPort.parse_authority(text)
