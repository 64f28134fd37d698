"""policy/judge.py, table-tested: which resolved addresses a client may be connected to.

Each row: the destination, the addresses it resolved to, the client's deny rules and mode,
and what ``judge`` must answer (usable addresses, the refusal's type and reason, report mode's
would-be reason, and each address's verdict label)."""

from __future__ import annotations

import ipaddress

import pytest

from egressgate.errors import AddressProhibited, PolicyDenied
from egressgate.model import HostPort
from egressgate.policy.clients import ClientPolicy
from egressgate.policy.guard import AddressGuard, OwnListeners
from egressgate.policy.judge import judge
from egressgate.policy.rules import RuleSet

GUARD = AddressGuard()
OWN = OwnListeners(exact=frozenset({("34.120.0.7", 3128)}), exact_ports=frozenset({3128}),
                   any_port=frozenset({9128}), local=frozenset({"34.120.0.9"}))


def client(deny: tuple[str, ...] = (), report: bool = False) -> ClientPolicy:
    return ClientPolicy("job", (ipaddress.ip_network("10.0.0.0/8"),), deny=RuleSet(list(deny)),
                        report_only=report)


ALLOWED = "allowed"
CASES = [
    # (id, dest, addresses, client, usable, refusal type, reason, would_deny, labels)
    ("one-public", "api.example.com:443", ["93.184.216.34"], client(), ["93.184.216.34"], None, None, None,
     [ALLOWED]),
    ("keeps-resolver-order", "api.example.com:443", ["93.184.216.35", "93.184.216.34"], client(),
     ["93.184.216.35", "93.184.216.34"], None, None, None, [ALLOWED, ALLOWED]),
    ("loopback-only", "evil.example:443", ["127.0.0.1"], client(), [], AddressProhibited,
     "destination_ip_prohibited", None, ["refused: loopback"]),
    ("metadata", "169.254.169.254:80", ["169.254.169.254"], client(), [], AddressProhibited,
     "destination_ip_prohibited", None, ["refused: metadata"]),
    ("private-dropped-public-kept", "mixed.example:443", ["10.1.2.3", "93.184.216.34"], client(),
     ["93.184.216.34"], None, None, None, ["refused: private", ALLOWED]),
    ("v4-mapped-loopback", "mapped.example:443", ["::ffff:127.0.0.1"], client(), [], AddressProhibited,
     "destination_ip_prohibited", None, ["refused: loopback"]),
    ("own-listener-exact", "me.example:3128", ["34.120.0.7"], client(), [], AddressProhibited,
     "destination_ip_prohibited", None, ["refused: this gateway's own listener"]),
    ("own-address-other-port", "me.example:443", ["34.120.0.7"], client(), ["34.120.0.7"], None, None,
     None, [ALLOWED]),
    ("own-any-port-listener-local-address", "me.example:9128", ["34.120.0.9"], client(), [],
     AddressProhibited, "destination_ip_prohibited", None, ["refused: this gateway's own listener"]),
    ("deny-cidr-all", "api.example.com:443", ["93.184.216.34"], client(deny=("93.184.216.0/24",)), [],
     PolicyDenied, "destination_denied", None, ["denied by rule 93.184.216.0/24"]),
    ("deny-cidr-some", "api.example.com:443", ["93.184.216.34", "8.8.8.8"], client(deny=("93.184.216.0/24",)),
     ["8.8.8.8"], None, None, None, ["denied by rule 93.184.216.0/24", ALLOWED]),
    ("deny-cidr-report-mode", "api.example.com:443", ["93.184.216.34"],
     client(deny=("93.184.216.0/24",), report=True), ["93.184.216.34"], None, None, "destination_denied",
     ["denied by rule 93.184.216.0/24"]),
    ("guard-never-relaxed-by-report-mode", "evil.example:443", ["127.0.0.1"], client(report=True), [],
     AddressProhibited, "destination_ip_prohibited", None, ["refused: loopback"]),
    ("deny-port-scoped-other-port", "api.example.com:443", ["93.184.216.34"],
     client(deny=("93.184.216.0/24:8443",)), ["93.184.216.34"], None, None, None, [ALLOWED]),
    ("deny-port-scoped-same-port", "api.example.com:8443", ["93.184.216.34"],
     client(deny=("93.184.216.0/24:8443",)), [], PolicyDenied, "destination_denied", None,
     ["denied by rule 93.184.216.0/24:8443"]),
    ("no-addresses", "nothing.example:443", [], client(), [], AddressProhibited, "destination_ip_prohibited",
     None, []),
]


@pytest.mark.parametrize("dest,addresses,c,usable,kind,reason,would_deny,labels",
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_judge(dest, addresses, c, usable, kind, reason, would_deny, labels) -> None:
    j = judge(HostPort.parse_authority(dest), addresses, c, GUARD, OWN)
    assert list(j.usable) == usable
    assert [v.label for v in j.verdicts] == labels
    assert j.would_deny == would_deny
    if kind is None:
        assert j.refusal is None
    else:
        assert type(j.refusal) is kind and j.refusal.reason == reason


def test_refusal_names_the_name_and_the_address_it_resolved_to() -> None:
    j = judge(HostPort.parse_authority("evil.example:443"), ["127.0.0.1"], client(), GUARD, OWN)
    assert "evil.example resolves to 127.0.0.1: loopback address" in str(j.refusal)
    lit = judge(HostPort.parse_authority("127.0.0.1:443"), ["127.0.0.1"], client(), GUARD, OWN)
    assert "127.0.0.1: loopback address" in str(lit.refusal) and "resolves" not in str(lit.refusal)
    denied = judge(HostPort.parse_authority("api.example.com:443"), ["93.184.216.34"],
                   client(deny=("93.184.216.0/24",)), GUARD, OWN)
    assert "api.example.com resolves to 93.184.216.34 (93.184.216.0/24)" in str(denied.refusal)
