"""Token verification under a flood (issue 25 item 1): what no signature can cure is refused
before any signature check or key fetch, and signature checks are bounded per source and in
total (429 ``token_checks_busy``), on a thread of their own. Real gateway on loopback, tokens
signed in the test; the bound itself on a real event loop with the real throttle."""

from __future__ import annotations

import asyncio
import ipaddress
import threading

import jwt
import pytest

from egressgate.errors import AuthRequired, LimitReached
from egressgate.policy.clients import ClientPolicy, ClientRegistry
from egressgate.policy.tokens import TokenPolicy, parse_jwks

from .oidc import Signer, new_key
from .test_kubernetes_tokens import connect, issuer, k8s_config, started  # noqa: F401  (fixture)


def _signed_by_a_stranger(signer: Signer, kid: str = "k1", **claims) -> str:
    """A token naming the issuer's key ``kid`` but signed by another key: only its signature is wrong."""
    return jwt.encode(signer.claims(**claims), new_key("RSA"), algorithm="RS256", headers={"kid": kid})


def test_what_no_signature_can_cure_is_refused_before_any_signature_check_or_key_fetch(
        start_gateway, issuer, ca_file):  # noqa: F811
    """Defect: an expired or misaddressed token paid a signature check first (and was refused
    as ``token_bad_signature`` when that failed), and one naming an unknown key made the
    gateway fetch the issuer's keys again. Now the unverified claims are judged first."""
    gw = started(start_gateway, k8s_config(issuer, ca_file, min_refresh=0))
    fetched = len(issuer.requests)
    cases = {
        "127.0.0.1:1001": (_signed_by_a_stranger(issuer, issued=-700, lifetime=600), "token_expired"),
        "127.0.0.1:1002": (_signed_by_a_stranger(issuer, aud=["vault"]), "token_wrong_audience"),
        "127.0.0.1:1003": (_signed_by_a_stranger(issuer, kid="zz9", issued=-700, lifetime=600), "token_expired"),
        "127.0.0.1:1004": (_signed_by_a_stranger(issuer), "token_bad_signature"),  # (the signature judged last)
    }
    for target, (token, _) in cases.items():
        assert connect(gw, target, f"Bearer {token}").startswith(b"HTTP/1.1 407")
    for target, (_, reason) in cases.items():
        rec = gw.wait_log(lambda r, t=target: r["target"] == t)
        assert rec["reason"] == reason, (target, rec)
    assert len(issuer.requests) == fetched  # no key fetch for a token no key could make valid


SIGNER = Signer()
POLICY = TokenPolicy(issuer=SIGNER.url, audiences=("egressgate",), accounts=("batch/*",), source=SIGNER.url,
                     static_keys=parse_jwks(SIGNER.jwks("k1")))


def test_token_signature_checks_are_bounded_per_source_and_in_total_and_dropped_when_left():
    """Defect: every distinct token cost a signature check at once, on the event loop, without
    bound. Now they run on the token throttle's thread: at most 64 waiting or running per
    source and 256 in all (429 ``token_checks_busy`` beyond, before any signature work), and a
    waiting check whose client left is dropped."""
    from egressgate.policy.clients import PendingTokenCheck
    from egressgate.proxy.limits import MAX_TOKEN_CHECKS, MAX_TOKEN_CHECKS_PER_SOURCE, AuthChecks

    class HeldCheck(PendingTokenCheck):
        """The real check, held until the test lets it run (so checks are in flight together)."""

        __slots__ = ("gate",)

        def run(self) -> bool:
            assert self.gate.wait(30)
            return super().run()

    reg = ClientRegistry([ClientPolicy("batch", (ipaddress.ip_network("10.0.0.0/8"),), token=POLICY)])
    gate = threading.Event()
    bad = [_signed_by_a_stranger(SIGNER, ns="batch", sa=f"a{i}") for i in range(MAX_TOKEN_CHECKS_PER_SOURCE)]
    good = SIGNER.mint(ns="batch", sa="s16")

    def pending(token: str) -> HeldCheck:
        found = reg.identify("10.0.0.1", f"Bearer {token}".encode())
        assert isinstance(found, PendingTokenCheck)  # (the signature is not checked in identify)
        held = HeldCheck(found.key, found.token, found.policy, found.signing_key, found.verified)
        held.gate = gate
        return held

    async def scenario() -> None:
        checks = AuthChecks(asyncio.get_running_loop())
        try:
            tasks = []
            for token in bad:  # one source: its bound, all bad signatures
                p = pending(token)
                tasks.append(asyncio.ensure_future(checks.tokens.check("10.0.0.1", p)))
            await asyncio.sleep(0)
            with pytest.raises(LimitReached) as info:
                await checks.tokens.check("10.0.0.1", pending(_signed_by_a_stranger(SIGNER, ns="batch", sa="over")))
            assert info.value.reason == "token_checks_busy" and info.value.status == 429
            n = MAX_TOKEN_CHECKS_PER_SOURCE
            source = 2
            while n < MAX_TOKEN_CHECKS:  # other sources up to the total bound
                for _ in range(min(MAX_TOKEN_CHECKS_PER_SOURCE, MAX_TOKEN_CHECKS - n)):
                    p = pending(good if n == MAX_TOKEN_CHECKS_PER_SOURCE else SIGNER.mint(ns="batch", sa=f"s{n}"))
                    tasks.append(asyncio.ensure_future(checks.tokens.check(f"10.0.0.{source}", p)))
                    n += 1
                source += 1
            await asyncio.sleep(0)
            assert checks.tokens.in_flight == MAX_TOKEN_CHECKS
            with pytest.raises(LimitReached) as info:
                await checks.tokens.check("10.9.9.9", pending(SIGNER.mint(ns="batch", sa="late")))
            assert info.value.reason == "token_checks_busy"
            tasks[-1].cancel()  # a client gone: its waiting check is dropped, never run
            await asyncio.sleep(0)
            assert checks.tokens.dropped == 1 and checks.tokens.in_flight == MAX_TOKEN_CHECKS - 1
            gate.set()
            results = await asyncio.gather(*tasks[:-1])
            assert results[:MAX_TOKEN_CHECKS_PER_SOURCE] == [False] * MAX_TOKEN_CHECKS_PER_SOURCE
            assert all(results[MAX_TOKEN_CHECKS_PER_SOURCE:])
            assert checks.tokens.in_flight == 0
        finally:
            gate.set()
            checks.close()

    asyncio.run(scenario())
    # the verdicts are remembered: the same tokens are answered at once, with no check
    with pytest.raises(AuthRequired) as info:
        reg.identify("10.0.0.1", f"Bearer {bad[0]}".encode())
    assert info.value.reason == "token_bad_signature"
    assert reg.identify("10.0.0.1", f"Bearer {good}".encode()).name == "batch/s16"
