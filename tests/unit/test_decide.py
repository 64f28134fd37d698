"""policy/decide.py: allow/deny, report mode, CONNECT ports, profile choice, metadata names."""

from __future__ import annotations

import ipaddress

import pytest

from egressgate.model import Decision, HostPort
from egressgate.policy.clients import ClientPolicy
from egressgate.policy.decide import choose_profile, decide
from egressgate.policy.rules import RuleSet

PORTS = frozenset({443})


def client(allow: list[str] | None = None, deny: list[str] = (), profiles: tuple[str, ...] = (),
           report: bool = False) -> ClientPolicy:
    return ClientPolicy("job", (ipaddress.ip_network("10.0.0.0/8"),), profiles=profiles,
                        allow=None if allow is None else RuleSet(allow), deny=RuleSet(deny),
                        report_only=report)


def run(c: ClientPolicy, dest: str, connect: bool = True, requested: str | None = None,
        listener_default: str = "default", ports: frozenset[int] = PORTS) -> Decision:
    return decide(c, HostPort.parse_authority(dest), connect, requested, listener_default, ports)


CASES = [
    # (name, client, dest, connect, requested, (allow, reason, rule, profile, report_only))
    ("open-connect-443", client(), "example.com:443", True, None, (True, "allowed", "", "default", False)),
    ("open-connect-22", client(), "example.com:22", True, None,
     (False, "connect_port_not_allowed", "connect_ports: [443]", "default", False)),
    ("open-http-any-port", client(), "example.com:8080", False, None, (True, "allowed", "", "default", False)),
    ("allow-exact", client(allow=["api.example.com"]), "api.example.com:443", True, None,
     (True, "allowed", "api.example.com", "default", False)),
    ("allow-miss", client(allow=["api.example.com"]), "www.example.com:443", True, None,
     (False, "destination_not_allowed", "allow", "default", False)),
    ("allow-suffix-not-apex", client(allow=["*.example.com"]), "example.com:443", True, None,
     (False, "destination_not_allowed", "allow", "default", False)),
    ("allow-empty-list-denies-all", client(allow=[]), "example.com:443", True, None,
     (False, "destination_not_allowed", "allow", "default", False)),
    ("allow-port-named-opens-connect", client(allow=["api.example.com:8443"]), "api.example.com:8443", True,
     None, (True, "allowed", "api.example.com:8443", "default", False)),
    ("allow-host-but-connect-port", client(allow=["api.example.com"]), "api.example.com:22", True, None,
     (False, "connect_port_not_allowed", "connect_ports: [443]", "default", False)),
    ("allow-host-http-any-port", client(allow=["api.example.com"]), "api.example.com:8080", False, None,
     (True, "allowed", "api.example.com", "default", False)),
    ("allow-cidr", client(allow=["8.8.8.0/24"]), "8.8.8.8:443", True, None,
     (True, "allowed", "8.8.8.0/24", "default", False)),
    ("deny-wins-over-allow", client(allow=["*.example.com"], deny=["bad.example.com"]), "bad.example.com:443",
     True, None, (False, "destination_denied", "bad.example.com", "default", False)),
    ("deny-suffix", client(deny=["*.evil.example"]), "a.evil.example:443", True, None,
     (False, "destination_denied", "*.evil.example", "default", False)),
    ("deny-cidr", client(deny=["8.8.8.0/24"]), "8.8.8.8:443", True, None,
     (False, "destination_denied", "8.8.8.0/24", "default", False)),
    ("deny-other-host", client(deny=["bad.example.com"]), "good.example.com:443", True, None,
     (True, "allowed", "", "default", False)),
    ("metadata-name", client(), "metadata.google.internal:80", False, None,
     (False, "destination_ip_prohibited", "metadata host name", "default", False)),
    ("metadata-name-case-dot", client(allow=["*"]), "Metadata.Google.Internal.:80", False, None,
     (False, "destination_ip_prohibited", "metadata host name", "default", False)),
    ("metadata-short", client(), "metadata:80", False, None,
     (False, "destination_ip_prohibited", "metadata host name", "default", False)),
    ("metadata-aws", client(), "instance-data.ec2.internal:80", False, None,
     (False, "destination_ip_prohibited", "metadata host name", "default", False)),
    ("report-mode-lets-through", client(allow=["api.example.com"], report=True), "www.example.com:443", True,
     None, (True, "destination_not_allowed", "allow", "default", True)),
    ("report-mode-deny", client(deny=["bad.example.com"], report=True), "bad.example.com:443", True, None,
     (True, "destination_denied", "bad.example.com", "default", True)),
    ("report-mode-allowed-is-plain", client(allow=["api.example.com"], report=True), "api.example.com:443",
     True, None, (True, "allowed", "api.example.com", "default", False)),
    ("profile-first-is-default", client(profiles=("vendor-x", "vendor-y")), "example.com:443", True, None,
     (True, "allowed", "", "vendor-x", False)),
    ("profile-requested-allowed", client(profiles=("vendor-x", "vendor-y")), "example.com:443", True,
     "vendor-y", (True, "allowed", "", "vendor-y", False)),
    ("profile-requested-not-allowed", client(profiles=("vendor-x",)), "example.com:443", True, "vendor-y",
     (False, "profile_not_allowed", "profiles: vendor-x", "vendor-y", False)),
    ("profile-not-allowed-even-in-report", client(profiles=("vendor-x",), report=True), "example.com:443",
     True, "vendor-y", (False, "profile_not_allowed", "profiles: vendor-x", "vendor-y", False)),
    ("profile-listener-default", client(), "example.com:443", True, "default",
     (True, "allowed", "", "default", False)),
    ("profile-listener-default-other", client(), "example.com:443", True, "vendor-x",
     (False, "profile_not_allowed", "profiles: default", "vendor-x", False)),
]


@pytest.mark.parametrize(("c", "dest", "connect", "requested", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_decide(c: ClientPolicy, dest: str, connect: bool, requested: str | None, expected: tuple) -> None:
    d = run(c, dest, connect, requested)
    assert (d.allow, d.reason, d.rule, d.profile, d.report_only) == expected


def test_listener_default_is_used_when_client_names_no_profile() -> None:
    d = run(client(), "example.com:443", listener_default="vendor-z")
    assert d.allow and d.profile == "vendor-z"


def test_connect_ports_come_from_the_argument() -> None:
    assert run(client(), "example.com:8443", ports=frozenset({443, 8443})).allow
    assert not run(client(), "example.com:443", ports=frozenset({8443})).allow


CHOOSE = [
    ((), None, "default", "default"),
    ((), "default", "default", "default"),
    ((), "other", "default", None),
    (("a", "b"), None, "default", "a"),
    (("a", "b"), "b", "default", "b"),
    (("a", "b"), "default", "default", None),
]


@pytest.mark.parametrize(("profiles", "requested", "listener_default", "expected"), CHOOSE)
def test_choose_profile(profiles, requested, listener_default, expected) -> None:
    assert choose_profile(client(profiles=profiles), requested, listener_default) == expected


def test_report_mode_does_not_relax_the_metadata_name_check() -> None:
    d = run(client(report=True), "metadata.google.internal:80", connect=False)
    assert not d.allow


def test_deny_cidr_applies_to_the_ipv4_mapped_literal() -> None:
    d = run(client(deny=["8.8.8.0/24"]), "[::ffff:8.8.8.8]:443")
    assert not d.allow
    assert d.reason == "destination_denied"
