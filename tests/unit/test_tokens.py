"""Kubernetes service-account tokens, verified offline (``policy.tokens``) and matched to client
entries (``policy.clients``): no sockets, the key set passed in, tokens minted here."""

from __future__ import annotations

import base64
import ipaddress
import json
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from egressgate.errors import AuthRequired, PolicyDenied
from egressgate.policy.clients import ClientPolicy, ClientRegistry, Identity, PendingKeys, _token_credentials
from egressgate.policy.tokens import MAX_TOKEN_BYTES, TokenPolicy, UnknownKey, parse_jwks, verify

from ..integration.oidc import Signer, b64, public_jwk

S = Signer()
KEYS = parse_jwks(S.jwks("k1", "e1"))
POLICY = TokenPolicy(issuer=S.url, audiences=("egressgate",), accounts=("data-jobs/vendor-x-collector", "batch/*"),
                     leeway=5.0, source=S.url)


def tampered() -> str:
    header, payload, sig = S.mint().split(".")
    doc = json.loads(base64.urlsafe_b64decode(payload + "=="))
    doc["kubernetes.io"]["namespace"] = "kube-system"
    return ".".join((header, b64(json.dumps(doc).encode()), sig))


# name -> (token, reason of the 407)
REFUSED = {
    "expired": (lambda: S.mint(issued=-700, lifetime=600), "token_expired"),
    "not yet valid": (lambda: S.mint(issued=120), "token_not_yet_valid"),
    "wrong audience": (lambda: S.mint(aud=["vault"]), "token_wrong_audience"),
    "wrong issuer": (lambda: S.mint(iss="https://other.example"), "token_unknown_issuer"),
    "alg none": (lambda: S.forged("none"), "token_bad_algorithm"),
    "HS256 keyed with the public key": (lambda: S.forged("HS256"), "token_bad_algorithm"),
    "tampered payload": (tampered, "token_bad_signature"),
    "RS256 header on the EC key": (lambda: S.mint("k1").replace(S.mint("k1").split(".")[0], b64(
        json.dumps({"alg": "RS256", "kid": "e1"}).encode()), 1), "token_bad_algorithm"),
    "oversized": (lambda: "a." + "b" * MAX_TOKEN_BYTES + ".c", "token_malformed"),
    "garbage": (lambda: "not.a.jwt", "token_malformed"),
    "no kubernetes.io claims": (lambda: S.mint(**{"kubernetes.io": None}), "token_malformed"),
    "sub of another account": (lambda: S.mint(sub="system:serviceaccount:kube-system:admin"), "token_malformed"),
    "no exp": (lambda: S.mint(exp=None), "token_malformed"),
    "unknown kid": (lambda: S.mint("k9") if S.publish("k1", "e1", "k9") is None else "", "token_unknown_key"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused(name: str) -> None:
    make, reason = REFUSED[name]
    with pytest.raises(AuthRequired) as info:
        verify(make(), POLICY, KEYS)
    assert info.value.reason == reason
    assert info.value.status == 407
    assert "eyJ" not in info.value.detail  # nothing of the token in the answer


@pytest.mark.parametrize("kid", ["k1", "e1"])
def test_rs256_and_es256_verify(kid: str) -> None:
    subject = verify(S.mint(kid), POLICY, KEYS)
    assert (subject.name, subject.pod, subject.issuer) == ("data-jobs/vendor-x-collector", "collector-7d9f", S.url)


def test_leeway_admits_a_small_skew() -> None:
    verify(S.mint(issued=3), POLICY, KEYS)


def test_jwks_keeps_only_asymmetric_signing_keys() -> None:
    doc = S.jwks("k1")
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    doc["keys"] += [{"kty": "oct", "kid": "h", "k": b64(b"secret")}, public_jwk("weak", weak),
                    {**public_jwk("enc", S.keys["e1"]), "use": "enc"}, "junk"]
    assert set(parse_jwks(doc)) == {"k1"}
    for bad in ({}, {"keys": "x"}, {"keys": [{"kty": "oct", "k": "AA"}]}):
        with pytest.raises(ValueError):
            parse_jwks(bad)


def test_admits_exact_and_namespace_wildcard() -> None:
    assert POLICY.admits(verify(S.mint(ns="batch", sa="nightly"), POLICY, KEYS))
    assert not POLICY.admits(verify(S.mint(ns="batchx", sa="nightly"), POLICY, KEYS))
    assert not POLICY.admits(verify(S.mint(sa="other"), POLICY, KEYS))


# --- matching client entries ----------------------------------------------------------------

class Keys:
    """A key provider whose refresh is counted (the real one fetches: keysource)."""

    def __init__(self, keys) -> None:
        self.current = keys
        self.refreshes = 0

    def keys(self, policy):
        return self.current

    def refresh(self, policy):
        self.refreshes += 1

        async def wait() -> None:
            pass

        return wait if self.refreshes == 1 else None


def registry(keys=KEYS) -> ClientRegistry:
    net = (ipaddress.ip_network("10.0.0.0/8"),)
    reg = ClientRegistry([
        ClientPolicy("pw", net, username="job", password_plain="secret"),
        ClientPolicy("vendor-x", net, token=POLICY, profiles=("vx",)),
        ClientPolicy("batch", net, token=TokenPolicy(issuer=S.url, audiences=("egressgate",), accounts=("batch/*",),
                                                     source=S.url)),
    ])
    reg.keys = Keys(keys)
    return reg


def bearer(token: str) -> bytes:
    return b"Bearer " + token.encode()


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def test_bearer_and_basic_identify_the_service_account() -> None:
    reg = registry()
    token = S.mint()
    for auth, profile in ((bearer(token), None), (basic("k8s", token), None), (basic("k8s+vx", token), "vx")):
        ident = reg.identify_now("10.1.2.3", auth)
        assert isinstance(ident, Identity)
        assert (ident.client.name, ident.name, ident.requested_profile) == ("vendor-x", "data-jobs/vendor-x-collector",
                                                                            profile)


def test_second_entry_takes_another_account_and_none_takes_a_stranger() -> None:
    reg = registry()
    assert reg.identify_now("10.1.2.3", bearer(S.mint(ns="batch", sa="x"))).client.name == "vendor-x"  # batch/* there too
    with pytest.raises(AuthRequired) as info:
        reg.identify_now("10.1.2.3", bearer(S.mint(ns="ops", sa="x")))
    assert info.value.reason == "service_account_not_allowed" and info.value.user == "ops/x"


def test_passwords_still_work_and_tokens_need_a_token_entry_for_the_address() -> None:
    reg = registry()
    assert reg.identify_now("10.1.2.3", basic("job", "secret")).client.name == "pw"
    with pytest.raises(PolicyDenied):
        reg.identify_now("192.0.2.1", bearer(S.mint()))


def test_no_credentials_never_match_a_token_entry() -> None:
    with pytest.raises(AuthRequired) as info:
        registry().identify_now("10.1.2.3", None)
    assert info.value.reason == "auth_required"


def test_verified_token_is_cached_until_it_expires() -> None:
    reg = registry()
    token = S.mint()
    first = reg.identify_now("10.1.2.3", bearer(token))
    reg.keys.current = {}  # a second look would find no key: the cache answers
    assert reg.identify_now("10.1.2.3", bearer(token)).subject == first.subject
    reg._clock = lambda: first.subject.expires + 60
    with pytest.raises(AuthRequired) as info:  # judged again (not remembered), before any key is looked up
        reg.identify_now("10.1.2.3", bearer(token))
    assert info.value.reason == "token_expired"


def test_unknown_key_asks_for_a_refresh_once() -> None:
    reg = registry()
    token = S.mint("k2") if S.publish("k1", "e1", "k2") is None else ""
    pending = reg.identify_now("10.1.2.3", bearer(token))
    assert isinstance(pending, PendingKeys) and isinstance(pending.error, UnknownKey)
    with pytest.raises(UnknownKey):  # refreshed already: rate-limited
        reg.identify_now("10.1.2.3", bearer(token))


def test_keys_never_fetched() -> None:
    reg = registry(keys=None)
    assert isinstance(reg.identify_now("10.1.2.3", bearer(S.mint())), PendingKeys)
    with pytest.raises(AuthRequired) as info:
        reg.identify_now("10.1.2.3", bearer(S.mint()))
    assert info.value.reason == "token_keys_unavailable"


@pytest.mark.parametrize("auth", [b"Bearer", b"Bearer \xff.\xfe.x", b"Bearer abc", basic("k8s", "password")])
def test_malformed_credentials(auth: bytes) -> None:
    with pytest.raises(AuthRequired) as info:
        _token_credentials(auth, frozenset({"k8s"}))
    assert info.value.reason == "token_malformed"


def test_other_basic_users_are_not_tokens() -> None:
    assert _token_credentials(basic("job", "a.b.c"), frozenset({"k8s"})) is None


def test_a_final_refusal_is_remembered_and_a_premature_one_is_not() -> None:
    reg = registry()
    expired, early = S.mint(issued=-700, lifetime=600), S.mint(issued=120)
    for token, reason in ((expired, "token_expired"), (early, "token_not_yet_valid")):
        with pytest.raises(AuthRequired) as info:
            reg.identify_now("10.1.2.3", bearer(token))
        assert info.value.reason == reason
    reg.keys.current = {}  # a second verification would now say "unknown key"
    with pytest.raises(AuthRequired) as info:
        reg.identify_now("10.1.2.3", bearer(expired))
    assert info.value.reason == "token_expired"  # remembered: not verified again
    later = time.time() + 200
    reg._clock = lambda: later
    assert isinstance(reg.identify_now("10.1.2.3", bearer(early)), PendingKeys)  # judged again: valid by now


def test_an_entry_refusing_a_token_does_not_hide_a_later_entry_that_takes_it() -> None:
    """Two entries of one issuer with different audiences: a token for the second is refused by
    the first (wrong audience) and taken by the second (it used to get the first's 407)."""
    net = (ipaddress.ip_network("10.0.0.0/8"),)
    reg = ClientRegistry([
        ClientPolicy("egress-aud", net, token=POLICY),
        ClientPolicy("vault-aud", net, token=TokenPolicy(issuer=S.url, audiences=("vault",), accounts=("batch/*",),
                                                         source=S.url)),
    ])
    reg.keys = Keys(KEYS)
    token = S.mint(aud=["vault"], ns="batch", sa="x")
    for _ in range(2):  # (the first entry's refusal is remembered: the second still takes it)
        assert reg.identify_now("10.1.2.3", bearer(token)).client.name == "vault-aud"
    with pytest.raises(AuthRequired) as info:  # a token neither takes: the first entry's reason
        reg.identify_now("10.1.2.3", bearer(S.mint(aud=["other"], ns="batch", sa="x")))
    assert info.value.reason == "token_wrong_audience"


def test_a_remembered_refusal_holds_no_traceback() -> None:
    """The refusal kept for a token must not be the raised exception: its traceback holds every
    frame up to the handler (the connection, its request head), for as long as it is kept."""
    reg = registry()
    token = S.mint(issued=-700, lifetime=600)
    with pytest.raises(AuthRequired):
        reg.identify_now("10.1.2.3", bearer(token))
    kept = [v for _, verified in reg._tokens.values() for v in verified.values() if isinstance(v, AuthRequired)]
    assert kept and all(e.__traceback__ is None and e.__context__ is None for e in kept)


# name -> (token, reason): refused from the unverified claims, before any key or signature work
PRECHECKED = {
    "expired": (lambda: S.mint(issued=-700, lifetime=600), "token_expired"),
    "not yet valid": (lambda: S.mint(issued=120), "token_not_yet_valid"),
    "wrong audience": (lambda: S.mint(aud=["vault"]), "token_wrong_audience"),
    "wrong issuer": (lambda: S.mint(iss="https://other.example"), "token_unknown_issuer"),
    "no exp": (lambda: S.mint(exp=None), "token_malformed"),
    "exp not a number": (lambda: S.mint(exp="soon"), "token_malformed"),
}


@pytest.mark.parametrize("name", list(PRECHECKED))
def test_what_no_signature_can_cure_is_refused_with_no_key_and_no_signature_check(name: str) -> None:
    """Issue 25 item 1: an empty key set would make any signature check fail (or ask for keys):
    the refusal comes first, from the claims, and identify never asks for a check."""
    make, reason = PRECHECKED[name]
    reg = registry()
    reg.keys.current = {}
    with pytest.raises(AuthRequired) as info:
        reg.identify("10.1.2.3", bearer(make()))
    assert info.value.reason == reason


def test_a_token_passing_the_cheap_checks_leaves_its_signature_to_a_pending_check() -> None:
    from egressgate.policy.clients import PendingTokenCheck

    reg = registry()
    token = tampered()
    pending = reg.identify("10.1.2.3", bearer(token))
    assert isinstance(pending, PendingTokenCheck) and pending.run() is False
    with pytest.raises(AuthRequired) as info:  # (the issuer's other entry: its own check)
        reg.identify_now("10.1.2.3", bearer(token))
    assert info.value.reason == "token_bad_signature"
    with pytest.raises(AuthRequired) as info:  # every entry's refusal remembered: no check again
        reg.identify("10.1.2.3", bearer(token))
    assert info.value.reason == "token_bad_signature"


def test_a_reloaded_registry_keeps_token_verdicts_while_what_they_depend_on_is_unchanged() -> None:
    """Issue 25 item 1: after a reload every keep-alive connection identifies again; a token
    verified under the old config is known at once (no signature check to queue) while the
    issuer, audiences, leeway and key source are unchanged, and checked again when they change."""
    from egressgate.policy.clients import PendingTokenCheck

    old = registry()
    token = S.mint()
    assert isinstance(old.identify("10.1.2.3", bearer(token)), PendingTokenCheck)
    assert old.identify_now("10.1.2.3", bearer(token)).client.name == "vendor-x"
    new = registry()  # the same config compiled again: new policy objects
    new.adopt(old)
    assert new.identify("10.1.2.3", bearer(token)).client.name == "vendor-x"
    net = (ipaddress.ip_network("10.0.0.0/8"),)
    changed = ClientRegistry([ClientPolicy("vendor-x", net, token=TokenPolicy(
        issuer=S.url, audiences=("egressgate", "other"), accounts=POLICY.accounts, leeway=5.0, source=S.url))])
    changed.keys = Keys(KEYS)
    changed.adopt(new)
    assert isinstance(changed.identify("10.1.2.3", bearer(token)), PendingTokenCheck)
