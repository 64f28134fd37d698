"""policy/clients.py: first match wins, Basic parsing, ``user+profile``, 407 vs 403, PendingCheck."""

from __future__ import annotations

import base64
import ipaddress
from types import SimpleNamespace

import pytest

from egressgate.errors import AuthRequired, PolicyDenied
from egressgate.policy.clients import ClientPolicy, ClientRegistry, Identity, PendingCheck, compile_clients
from egressgate.policy.passwords import hash_password


def nets(*cidrs: str) -> tuple:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


@pytest.fixture(scope="module")
def hashed() -> str:
    return hash_password("hunter2")


def registry() -> ClientRegistry:
    """A table of rules exercised by the identify cases below (plain passwords: no scrypt)."""
    return ClientRegistry([
        ClientPolicy("cred-x", nets("10.8.0.0/16"), username="job-x", password_plain="sx",
                     profiles=("vendor-x", "default")),
        ClientPolicy("cert-y", nets("10.8.0.0/16"), cert_subject="job-y"),
        ClientPolicy("subnet-10-8-1", nets("10.8.1.0/24")),
        ClientPolicy("any-10", nets("10.0.0.0/8")),
        ClientPolicy("roaming", None, username="roamer", password_plain="sr"),
        ClientPolicy("v6", nets("2001:db8::/32")),
    ])


IDENTIFY = [
    # (peer, authorization, cert subject, client name or exception type, requested profile, reason)
    ("10.8.0.5", basic("job-x", "sx"), None, "cred-x", None, None),
    ("10.8.0.5", basic("job-x+vendor-x", "sx"), None, "cred-x", "vendor-x", None),
    ("10.8.0.5", basic("job-x+other", "sx"), None, "cred-x", "other", None),  # decide() judges the profile
    ("10.8.0.5", basic("job-x", "wrong"), None, AuthRequired, None, "bad_credentials"),
    # Credentials presented match only credentialed rules: never a fall-through to an anonymous one.
    ("10.8.0.5", basic("job-x+", "sx"), None, AuthRequired, None, "unknown_user"),
    ("10.8.0.5", None, "job-y", "cert-y", None, None),
    ("10.8.0.5", None, "someone-else", "any-10", None, None),  # neither cred-x nor cert-y: next rule
    ("10.8.0.5", basic("job-x", "wrong"), "job-y", AuthRequired, None, "bad_credentials"),  # no fall-through
    ("10.8.1.5", None, None, "subnet-10-8-1", None, None),  # first match by CIDR, after the skipped ones
    ("10.8.1.5", basic("job-x", "sx"), None, "cred-x", None, None),  # credentials pick the earlier rule
    ("10.9.0.1", None, None, "any-10", None, None),
    ("10.9.0.1", basic("nobody", "x"), None, AuthRequired, None, "unknown_user"),  # no rule takes them
    ("192.0.2.1", basic("roamer", "sr"), None, "roaming", None, None),  # from: any address
    ("192.0.2.1", basic("roamer", "bad"), None, AuthRequired, None, "bad_credentials"),
    ("192.0.2.1", basic("nobody", "x"), None, AuthRequired, None, "unknown_user"),
    ("192.0.2.1", None, None, AuthRequired, None, "auth_required"),  # 407, not 403
    ("2001:db8::5", None, None, "v6", None, None),
    ("::ffff:10.9.0.1", None, None, "any-10", None, None),  # IPv4-mapped peer judged as IPv4
    ("10.8.0.5", b"Bearer abc", None, AuthRequired, None, "bad_credentials"),
    ("10.8.0.5", b"Basic !!!notbase64", None, AuthRequired, None, "bad_credentials"),  # 407, not 400
    ("10.8.0.5", b"Basic " + base64.b64encode(b"no-colon"), None, AuthRequired, None, "bad_credentials"),
    ("10.8.0.5", b"Basic " + base64.b64encode(b"\xff\xfe:x"), None, AuthRequired, None, "bad_credentials"),
    ("10.8.0.5", b"  basic   " + base64.b64encode(b"job-x:sx") + b"  ", None, "cred-x", None, None),
    ("10.8.0.5", basic("job-x", "sx:with:colons"), None, AuthRequired, None, "bad_credentials"),
]


@pytest.mark.parametrize(("peer", "auth", "cert", "expected", "profile", "reason"), IDENTIFY,
                         ids=[f"{c[0]}-{c[1]!r}-{c[2]}" for c in IDENTIFY])
def test_identify(peer, auth, cert, expected, profile, reason) -> None:
    reg = registry()
    if isinstance(expected, str):
        result = reg.identify(peer, auth, cert)
        assert isinstance(result, Identity)
        assert result.client.name == expected
        assert result.requested_profile == profile
    else:
        with pytest.raises(expected) as info:
            reg.identify(peer, auth, cert)
        assert type(info.value) is expected
        assert info.value.reason == reason


def test_status_codes_407_and_403() -> None:
    reg = ClientRegistry([ClientPolicy("only-10", nets("10.0.0.0/8")),
                          ClientPolicy("creds", nets("192.0.2.0/24"), username="u", password_plain="p")])
    with pytest.raises(PolicyDenied) as denied:
        reg.identify("198.51.100.1", None)
    assert denied.value.status == 403
    assert denied.value.reason == "client_not_allowed"
    with pytest.raises(AuthRequired) as missing:
        reg.identify("192.0.2.7", None)
    assert missing.value.status == 407
    with pytest.raises(AuthRequired) as wrong:
        reg.identify("192.0.2.7", basic("u", "nope"))
    assert wrong.value.status == 407


def test_unknown_user_and_wrong_password_look_the_same_to_the_client() -> None:
    """No user enumeration: the answer's detail is identical; only the reason (logged, never
    sent) and the tried user name (logged, bounded) tell the cases apart."""
    reg = registry()
    refusals = {}
    for user in ("job-x", "nobody"):
        with pytest.raises(AuthRequired) as info:
            reg.identify("10.8.0.5", basic(user, "wrong"))
        refusals[user] = info.value
    known, unknown = refusals["job-x"], refusals["nobody"]
    assert known.detail == unknown.detail and known.proxy_status == unknown.proxy_status
    assert (known.reason, unknown.reason) == ("bad_credentials", "unknown_user")
    assert (known.user, unknown.user) == ("job-x", "nobody")
    with pytest.raises(AuthRequired) as long_name:
        reg.identify("10.8.0.5", basic("u" * 500, "x"))
    assert long_name.value.user == "u" * 64 + "..."
    with pytest.raises(AuthRequired) as none:
        reg.identify("192.0.2.1", None)
    assert none.value.user is None


def test_admits_and_candidates() -> None:
    reg = registry()
    assert reg.admits("10.8.0.1")
    assert reg.admits("192.0.2.1")  # 'roaming' has no source restriction
    names = [c.name for c in reg.candidates("10.8.1.9")]
    assert names == ["cred-x", "cert-y", "subnet-10-8-1", "any-10", "roaming"]
    strict = ClientRegistry([ClientPolicy("a", nets("10.0.0.0/8"))])
    assert strict.admits("10.1.1.1")
    assert strict.admits("::ffff:10.1.1.1")
    assert not strict.admits("11.0.0.1")
    assert not strict.admits("::1")


def test_pending_check_flow_right_password(hashed: str) -> None:
    reg = ClientRegistry([ClientPolicy("h", nets("10.0.0.0/8"), username="u", password_hash=hashed)])
    first = reg.identify("10.0.0.1", basic("u", "hunter2"))
    assert isinstance(first, PendingCheck)
    assert "hunter2" not in repr(first.key)
    assert first.run() is True
    second = reg.identify("10.0.0.1", basic("u", "hunter2"))
    assert isinstance(second, Identity)
    assert second.client.name == "h"
    # the remembered verdict is per stored hash and password: the +profile form needs no check
    # (which entry the user name selects is decided before, without the password)
    third = reg.identify("10.0.0.1", basic("u+p", "hunter2"))
    assert isinstance(third, Identity) and third.requested_profile == "p"


def test_pending_check_flow_wrong_password(hashed: str) -> None:
    reg = ClientRegistry([ClientPolicy("h", nets("10.0.0.0/8"), username="u", password_hash=hashed)])
    first = reg.identify("10.0.0.1", basic("u", "wrong"))
    assert isinstance(first, PendingCheck)
    assert first.run() is False
    with pytest.raises(AuthRequired) as info:
        reg.identify("10.0.0.1", basic("u", "wrong"))
    assert info.value.reason == "bad_credentials" and info.value.user == "u"
    assert first.user == "u"  # (the dispatcher's 407 after a failed check names it too)
    # a different (right) password is not affected by the remembered failure
    assert isinstance(reg.identify("10.0.0.1", basic("u", "hunter2")), PendingCheck)


def test_pending_check_results_do_not_leak_across_registries(hashed: str) -> None:
    policy = ClientPolicy("h", nets("10.0.0.0/8"), username="u", password_hash=hashed)
    a, b = ClientRegistry([policy]), ClientRegistry([policy])
    pending = a.identify("10.0.0.1", basic("u", "hunter2"))
    assert isinstance(pending, PendingCheck)
    pending.run()
    assert isinstance(a.identify("10.0.0.1", basic("u", "hunter2")), Identity)
    assert isinstance(b.identify("10.0.0.1", basic("u", "hunter2")), PendingCheck)


def _spec(**kw):
    base = dict(name="c", from_=None, username=None, password_hash=None, cert_subject=None, egress=[],
                allow=None, deny=[], mode="enforce", max_connections=None, max_new_per_second=None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_compile_clients() -> None:
    specs = [
        _spec(name="a", from_=["10.0.0.0/8"], egress=["vendor-x"], allow=["*.x.example", "x.example:8443"],
              deny=["bad.x.example"], mode="report", max_connections=5, max_new_per_second=None),
        _spec(name="b", username="u", egress=[]),
    ]
    reg = compile_clients(specs, lambda spec: "plain" if spec.name == "b" else None)
    a, b = reg.clients
    assert reg.by_name == {"a": a, "b": b}
    assert a.nets == (ipaddress.ip_network("10.0.0.0/8"),)
    assert a.profiles == ("vendor-x",)
    assert a.report_only and a.max_connections == 5
    assert a.allow is not None and a.allow.match("w.x.example", 443, False) == "*.x.example"
    assert a.allow.ports == frozenset({8443})
    assert a.deny is not None and a.deny.match("bad.x.example", 443, False) == "bad.x.example"
    assert a.allow_patterns == ("*.x.example", "x.example:8443")
    assert b.nets is None and b.allow is None and b.password_plain == "plain"
    assert not b.report_only
    assert isinstance(reg.identify("203.0.113.9", basic("u", "plain")), Identity)


def test_anonymous_rule_listed_first_never_captures_credentialed_requests() -> None:
    """Issue 11 item 6: ``local`` (no credentials) before ``job-x`` (credentials), same CIDR."""
    reg = ClientRegistry([ClientPolicy("local", nets("127.0.0.0/8")),
                          ClientPolicy("job-x", nets("127.0.0.0/8"), username="job-x", password_plain="s3cret",
                                       profiles=("vendor-x",))])
    right = reg.identify("127.0.0.1", basic("job-x", "s3cret"))
    assert isinstance(right, Identity) and right.client.name == "job-x"
    for wrong, reason in ((basic("job-x", "guess"), "bad_credentials"),
                          (basic("job-x+vendor-x", "guess"), "bad_credentials"),
                          (basic("someone", "s3cret"), "unknown_user")):
        with pytest.raises(AuthRequired) as info:
            reg.identify("127.0.0.1", wrong)
        assert info.value.status == 407 and info.value.reason == reason
    anonymous = reg.identify("127.0.0.1", None)  # no credentials: the anonymous rule still matches
    assert isinstance(anonymous, Identity) and anonymous.client.name == "local"


def test_wrong_passwords_never_evict_a_known_good_one_and_eviction_is_one_at_a_time():
    """Defect (issue 25 item 1): the cache of checked credentials was dropped whole when it
    filled, so a flood of wrong passwords made every known client pay a scrypt check again
    (behind the flood). Good and wrong verdicts are now kept apart, the oldest evicted alone."""
    from egressgate.policy.clients import MAX_REMEMBERED_PASSWORDS

    reg = ClientRegistry([ClientPolicy("c", None, username="u", password_hash=hash_password("good"))])
    auth = b"Basic " + base64.b64encode(b"u:good")
    pending = reg.identify("10.0.0.1", auth)
    assert isinstance(pending, PendingCheck) and pending.run()
    for i in range(MAX_REMEMBERED_PASSWORDS + 10):  # (the verdicts, without running scrypt)
        reg.verdicts.remember(f"wrong-{i}".encode(), False)
    assert isinstance(reg.identify("10.0.0.1", auth), Identity)  # still known: no check again
    assert len(reg.verdicts.wrong) == MAX_REMEMBERED_PASSWORDS
    assert b"wrong-9" not in reg.verdicts.wrong and b"wrong-10" in reg.verdicts.wrong  # only the oldest went


def test_a_reloaded_registry_knows_credentials_whose_hash_did_not_change() -> None:
    """Issue 25 item 1: verdicts are keyed by the stored hash and the password, and a reload's
    registry adopts the old one's: an entry that kept its hash (even renamed) needs no check
    again; an entry whose hash changed does."""
    kept, changed = hash_password("good"), hash_password("good")
    old = ClientRegistry([ClientPolicy("c", None, username="u", password_hash=kept)])
    auth = b"Basic " + base64.b64encode(b"u:good")
    pending = old.identify("10.0.0.1", auth)
    assert isinstance(pending, PendingCheck) and pending.run()
    same = ClientRegistry([ClientPolicy("renamed", None, username="u", password_hash=kept)])
    same.adopt(old)
    assert isinstance(same.identify("10.0.0.1", auth), Identity)
    new_hash = ClientRegistry([ClientPolicy("c", None, username="u", password_hash=changed)])
    new_hash.adopt(same)
    assert isinstance(new_hash.identify("10.0.0.1", auth), PendingCheck)
