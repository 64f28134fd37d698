"""policy/guard.py: special-purpose address ranges, embedded IPv4, allow_private exemptions."""

from __future__ import annotations

import ipaddress

import pytest

from egressgate.model import HostPort, normalize_host
from egressgate.policy.clients import ClientPolicy
from egressgate.policy.decide import decide
from egressgate.policy.guard import (
    METADATA_NAMES,
    AddressGuard,
    NameGuard,
    classify,
    embedded_ipv4,
    rfc6052_ipv4,
)
from egressgate.policy.rules import RuleSet

REFUSED = [
    # (address, reason)
    ("169.254.169.254", "metadata"),
    ("fd00:ec2::254", "metadata"),
    ("::ffff:169.254.169.254", "metadata"),
    ("64:ff9b::a9fe:a9fe", "metadata"),  # NAT64 of 169.254.169.254
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("10.0.0.1", "private"),
    ("10.255.255.255", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "cgnat"),
    ("100.127.255.254", "cgnat"),
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("169.254.1.1", "link_local"),
    ("192.0.0.8", "reserved"),
    ("192.0.2.1", "documentation"),
    ("198.51.100.1", "documentation"),
    ("203.0.113.10", "documentation"),
    ("198.18.0.1", "benchmarking"),
    ("198.19.255.1", "benchmarking"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("::10.0.0.1", "reserved"),  # deprecated IPv4-compatible
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("fe80::1", "link_local"),
    ("fec0::1", "link_local"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", "documentation"),
    ("2001::1", "reserved"),  # Teredo
    ("100::1", "reserved"),  # discard-only
    ("64:ff9b:1::1", "private"),  # local-use NAT64 (RFC 8215), its prefix not named: refused whole
    ("64:ff9b:1::808:808", "private"),
    ("64:ff9b:1::a9fe:a9fe", "metadata"),  # ... naming what the /96 place holds
    ("64:ff9b:1:abcd:7f:0:100:0", "private"),
    # IPv4-translated (RFC 2765/6145, ::ffff:0:0:0/96): judged by the IPv4 address
    ("::ffff:0:7f00:1", "loopback"),
    ("::ffff:0:a00:1", "private"),
    ("::ffff:0:a9fe:a9fe", "metadata"),
    ("::ffff:0:0:0", "unspecified"),
    ("::ffff:0:c0a8:101", "private"),
    # IPv6 forms that embed a forbidden IPv4 address are judged by the IPv4 address
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:100.64.0.1", "cgnat"),
    ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
    ("64:ff9b::7f00:1", "loopback"),
    ("2002:0a00:0001::", "private"),  # 6to4 of 10.0.0.1
    ("2002:7f00:0001::1", "loopback"),
    ("2002:a9fe:a9fe::", "metadata"),
]


@pytest.mark.parametrize(("address", "reason"), REFUSED, ids=[c[0] for c in REFUSED])
def test_refused(address: str, reason: str) -> None:
    assert AddressGuard().check(address) == reason
    assert classify(address) == reason


ALLOWED = [
    "8.8.8.8",
    "1.1.1.1",
    "100.63.255.255",  # just below CGNAT
    "100.128.0.0",  # just above CGNAT
    "172.15.255.255",
    "172.32.0.0",
    "11.0.0.1",
    "192.169.0.1",
    "223.255.255.255",
    "2606:4700::1111",
    "2001:4860:4860::8888",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",  # NAT64 of a public address
    "2002:0808:0808::1",  # 6to4 of a public address
    "::ffff:0:808:808",  # IPv4-translated public address
]


@pytest.mark.parametrize("address", ALLOWED)
def test_allowed(address: str) -> None:
    assert AddressGuard().check(address) is None
    assert classify(address) is None


EXEMPT = [
    # (allow_private, address, verdict)
    (["10.0.0.0/8"], "10.0.0.1", None),
    (["10.0.0.0/8"], "::ffff:10.0.0.1", None),  # the mapped form of an exempted address
    (["10.0.0.0/8"], "64:ff9b::a00:1", None),
    (["10.0.0.0/8"], "2002:0a00:0001::", None),
    (["10.0.0.0/8"], "10.255.0.1", None),
    (["10.0.0.0/24"], "10.0.1.1", "private"),  # outside the exemption
    (["10.0.0.0/8"], "127.0.0.1", "loopback"),
    (["10.0.0.0/8"], "::ffff:127.0.0.1", "loopback"),
    (["10.0.0.0/8"], "172.16.0.1", "private"),
    (["127.0.0.0/8"], "127.0.0.1", None),
    (["127.0.0.0/8"], "::1", "loopback"),  # v4 exemption does not cover v6 loopback
    (["::1/128"], "::1", None),
    (["::1/128"], "127.0.0.1", "loopback"),
    (["fd00::/8"], "fd00:1::1", None),
    (["169.254.169.254/32"], "169.254.169.254", None),
    ([], "10.0.0.1", "private"),
    # an exempted IPv6 range does not exempt the IPv4 address its addresses carry
    (["::ffff:0:0/96"], "::ffff:10.0.0.1", "private"),
    (["::ffff:0:0:0/96"], "::ffff:0:a00:1", "private"),
    (["64:ff9b::/96"], "64:ff9b::7f00:1", "loopback"),
    (["10.0.0.0/8"], "::ffff:0:a00:1", None),
    # a local-use NAT64 prefix named in allow_private: the IPv4 address at the place its length gives
    (["64:ff9b:1::/96"], "64:ff9b:1::808:808", None),
    (["64:ff9b:1::/96"], "64:ff9b:1::a00:1", "private"),
    (["64:ff9b:1::/96"], "64:ff9b:1::a9fe:a9fe", "metadata"),
    (["64:ff9b:1::/96", "10.0.0.0/8"], "64:ff9b:1::a00:1", None),
    (["64:ff9b:1:abcd::/64"], "64:ff9b:1:abcd:7f:0:100:0", "loopback"),  # 127.0.0.1 in bits 72-103
    (["64:ff9b:1:abcd::/64"], "64:ff9b:1:abcd:8:808:800:0", None),  # 8.8.8.8 there
    (["64:ff9b:1:ab00::/56"], "64:ff9b:1:ab0a:0:102:300::", "private"),  # 10.1.2.3: bits 56-63, 72-95
    (["64:ff9b:1::/48"], "64:ff9b:1:a9fe:a9:fe00::", "metadata"),  # bits 48-63, 72-87
    (["64:ff9b:1::/48"], "64:ff9b:1:808:8:800::", None),
    (["64:ff9b:1:abcd::/96"], "64:ff9b:1::a00:1", "private"),  # outside the named prefix
    (["64:ff9b::/32"], "64:ff9b:1::a00:1", None),  # a wider exemption: the operator's choice
]


@pytest.mark.parametrize(("exempt", "address", "verdict"), EXEMPT,
                         ids=[f"{c[0]}-{c[1]}" for c in EXEMPT])
def test_allow_private(exempt: list[str], address: str, verdict: str | None) -> None:
    assert AddressGuard(exempt).check(address) == verdict


def test_check_is_stable_when_cached() -> None:
    guard = AddressGuard(["10.0.0.0/8"])
    for _ in range(3):
        assert guard.check("10.1.2.3") is None
        assert guard.check("127.0.0.1") == "loopback"


def test_check_refuses_non_addresses() -> None:
    with pytest.raises(ValueError):
        AddressGuard().check("example.com")


EMBEDDED = [
    ("::ffff:10.0.0.1", "10.0.0.1"),
    ("64:ff9b::a00:1", "10.0.0.1"),
    ("2002:0a00:0001::", "10.0.0.1"),
    ("2002:0808:0808:1::5", "8.8.8.8"),
    ("::ffff:0:a00:1", "10.0.0.1"),  # IPv4-translated
    ("2606:4700::1111", None),
    ("10.0.0.1", None),
    ("64:ff9b:1::a00:1", None),  # local-use NAT64: the place depends on the operator's prefix
]


RFC6052 = [
    # (address, prefix length, embedded IPv4): RFC 6052 section 2.4's examples, moved into 64:ff9b:1::/48
    ("64:ff9b:1:c000:2:2100::", 48, "192.0.2.33"),
    ("64:ff9b:1:abc0:0:221::", 56, "192.0.2.33"),
    ("64:ff9b:1:abcd:c0:2:2100:0", 64, "192.0.2.33"),
    ("64:ff9b:1::c000:221", 96, "192.0.2.33"),
]


@pytest.mark.parametrize(("address", "length", "inner"), RFC6052)
def test_rfc6052_places(address: str, length: int, inner: str) -> None:
    assert str(rfc6052_ipv4(ipaddress.ip_address(address), length)) == inner


@pytest.mark.parametrize(("address", "inner"), EMBEDDED)
def test_embedded_ipv4(address: str, inner: str | None) -> None:
    got = embedded_ipv4(ipaddress.ip_address(address))
    assert (str(got) if got is not None else None) == inner


@pytest.mark.parametrize("name", ["metadata.google.internal", "metadata", "metadata.goog", "instance-data",
                                  "instance-data.ec2.internal", "METADATA.Google.Internal.", "Metadata."])
@pytest.mark.parametrize("connect", [True, False])
def test_metadata_names_are_refused(name: str, connect: bool) -> None:
    # what the gateway does with the name, not just whether it is listed: refused before any
    # lookup, in any spelling, for a client that may go anywhere -- even in report mode
    dest = HostPort.parse_authority(f"{name}:443")
    for report in (False, True):
        client = ClientPolicy("job", None, allow=RuleSet(["*"]), deny=RuleSet([]), report_only=report)
        d = decide(client, dest, connect, None, "default", frozenset({443}))
        assert (d.allow, d.reason) == (False, "destination_ip_prohibited"), (name, report, d)


def test_metadata_names_are_normalized() -> None:
    # decide() compares normalized hosts against this set: every entry must already be in that form
    for name in METADATA_NAMES:
        assert normalize_host(name) == name


# ------------------------------------------------------------------ the name guard (NameGuard)

NAMES_REFUSED = [
    # (host as the client spelled it, why): names that stand for internal addresses
    ("localhost", "a localhost name"),
    ("LOCALHOST.", "a localhost name"),
    ("LocalHost..", "a localhost name"),
    ("foo.localhost", "a localhost name"),
    ("a.b.LOCALHOST.", "a localhost name"),
    ("intranet", "a single-label name"),
    ("kubernetes", "a single-label name"),
    ("Metadata", "a single-label name"),
    ("db.internal", "an internal name (*.internal)"),
    ("metadata.google.internal", "an internal name (*.internal)"),
    ("printer.local", "an internal name (*.local)"),
    ("api.default.svc", "an internal name (*.svc)"),
    ("api.default.svc.cluster.local", "an internal name (*.local)"),
    ("API.Default.SVC.", "an internal name (*.svc)"),
    ("nas.home.arpa", "an internal name (*.home.arpa)"),
    ("router.lan", "an internal name (*.lan)"),
    ("box.localdomain", "an internal name (*.localdomain)"),
    ("wiki.corp", "an internal name (*.corp)"),
    ("wiki.intranet", "an internal name (*.intranet)"),
    ("x.private", "an internal name (*.private)"),
    ("nas.home", "an internal name (*.home)"),
]


@pytest.mark.parametrize(("host", "why"), NAMES_REFUSED, ids=[c[0] for c in NAMES_REFUSED])
def test_internal_names_are_refused(host: str, why: str) -> None:
    assert NameGuard().check(HostPort.parse_authority(f"{host}:443").host) == why


NAMES_ALLOWED = ["api.vendor-x.com", "example.com", "localhost.example.com", "svc.example.com",
                 "internal.example.org", "local.example", "home.example", "xn--bcher-kva.example", "a.b.c.d.e.f"]


@pytest.mark.parametrize("host", NAMES_ALLOWED)
def test_public_names_pass(host: str) -> None:
    assert NameGuard().check(HostPort.parse_authority(f"{host}:443").host) is None


NAMES_CONFIGURED = [
    # (deny_suffixes, allow_suffixes, host, verdict)
    (["corp.example"], [], "wiki.corp.example", "an internal name (*.corp.example)"),
    (["corp.example"], [], "corp.example", "an internal name (*.corp.example)"),
    (["corp.example"], [], "notcorp.example", None),
    (["data-jobs"], [], "results-store.data-jobs", "an internal name (*.data-jobs)"),  # a Kubernetes namespace
    ([], ["localhost"], "localhost", None),
    ([], ["localhost"], "api.localhost", None),
    ([], ["intranet-proxy"], "intranet-proxy", None),
    ([], ["intranet-proxy"], "other", "a single-label name"),
    ([], ["wiki.internal"], "wiki.internal", None),
    ([], ["wiki.internal"], "db.internal", "an internal name (*.internal)"),
    (["corp.example"], ["public.corp.example"], "public.corp.example", None),
    (["corp.example"], ["public.corp.example"], "secret.corp.example", "an internal name (*.corp.example)"),
]


@pytest.mark.parametrize(("deny", "allow", "host", "verdict"), NAMES_CONFIGURED,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in NAMES_CONFIGURED])
def test_operator_suffixes(deny: list[str], allow: list[str], host: str, verdict: str | None) -> None:
    assert NameGuard(deny, allow).check(host) == verdict


def test_name_guard_scope() -> None:
    assert not NameGuard().everywhere and not NameGuard(scope="upstream").everywhere
    assert NameGuard(scope="all").everywhere


def test_suffixes_in_config_are_normalized() -> None:
    from egressgate.config.schema import SecurityConfig

    sec = SecurityConfig(deny_suffixes=["*.Corp.Example.", ".data-jobs", "svc.cluster.example"],
                         allow_suffixes=["LOCALHOST"])
    assert sec.deny_suffixes == ["corp.example", "data-jobs", "svc.cluster.example"]
    assert sec.allow_suffixes == ["localhost"]
    for bad in ["", "*.", "10.0.0.1", "a b", "a..b", "x:80"]:
        with pytest.raises(ValueError):
            SecurityConfig(deny_suffixes=[bad])


def test_shown_target_drops_query_fragment_and_credentials():
    from egressgate.model import shown_target
    assert shown_target("http://u:p@h.example:8080/a/b?key=1#f") == "http://h.example:8080/a/b?"
    assert shown_target("http://h.example/a#frag") == "http://h.example/a?"
    assert shown_target("/a?x=1") == "/a?"
    assert shown_target("u:p@h.example:443") == "h.example:443"
    assert shown_target("h.example:443") == "h.example:443"
    assert shown_target("http://h.example/p@q") == "http://h.example/p@q"  # '@' in the path is no userinfo
