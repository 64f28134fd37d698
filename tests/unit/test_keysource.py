"""``keysource.KeySources``: when the issuer's keys are fetched, with the fetch itself faked at
its one seam (``_get_json``) and time injected: shared fetches, the ``min_refresh`` rate limit,
the background ``refresh``, keys kept through failures, and discovery checked."""

from __future__ import annotations

import asyncio

from egressgate.observe.metrics import Metrics
from egressgate.policy.tokens import TokenPolicy
from egressgate.services.keysource import DISCOVERY, KeySources

from ..integration.oidc import Signer

S = Signer("https://issuer.test")
POLICY = TokenPolicy(issuer=S.url, audiences=("egressgate",), accounts=("a/b",), source=S.url, refresh=3600.0,
                     min_refresh=10.0)


class Fake(KeySources):
    def __init__(self) -> None:
        self.now = 1000.0
        super().__init__(lambda: None, Metrics(), clock=lambda: self.now)
        self.fetched: list[str] = []
        self.down = False
        self.discovery = {"issuer": S.url, "jwks_uri": S.url + "/jwks"}

    async def _get_json(self, url: str, ca_file):
        self.fetched.append(url)
        await asyncio.sleep(0)
        if self.down:
            raise OSError("connection refused")
        return self.discovery if url.endswith(DISCOVERY) else S.jwks()


def run(coro):
    return asyncio.run(coro)


def test_first_fetch_is_shared_and_then_rate_limited() -> None:
    async def go(ks: Fake) -> None:
        assert ks.keys(POLICY) is None
        waits = [ks.refresh(POLICY), ks.refresh(POLICY)]
        await asyncio.gather(*(w() for w in waits))
        assert set(ks.keys(POLICY)) == {"k1", "e1"}
        assert ks.fetched == [S.url + DISCOVERY, S.url + "/jwks"]  # one fetch for both askers
        assert ks.refresh(POLICY) is None  # an unknown kid right after: rate-limited
        ks.now += 10
        await ks.refresh(POLICY)()
        assert len(ks.fetched) == 4

    run(go(Fake()))


def test_failure_keeps_the_keys_and_stale_keys_refresh_in_the_background() -> None:
    async def go(ks: Fake) -> None:
        await ks.refresh(POLICY)()
        ks.down = True
        ks.now += 60
        await ks.refresh(POLICY)()
        assert set(ks.keys(POLICY)) == {"k1", "e1"}  # the outage keeps them
        ks.down = False
        S.publish("k1", "e1", "k7")
        ks.now += 3600
        assert "k7" not in ks.keys(POLICY)  # stale: served as they are while a fetch starts
        await ks.refresh(POLICY)()  # (joins the fetch under way)
        assert "k7" in ks.keys(POLICY)
        assert len(ks.fetched) == 5  # (the failed fetch stopped at discovery)
        S.publish("k1", "e1")

    run(go(Fake()))


def test_discovery_naming_another_issuer_is_refused() -> None:
    async def go(ks: Fake) -> None:
        ks.discovery = {"issuer": "https://evil.test", "jwks_uri": "https://evil.test/jwks"}
        await ks.refresh(POLICY)()
        assert ks.keys(POLICY) is None
        assert ks.fetched == [S.url + DISCOVERY]

    run(go(Fake()))


def test_an_https_issuer_naming_a_plain_http_jwks_uri_is_refused() -> None:
    """Keys fetched in clear text could be swapped on the way (then forged tokens pass)."""
    async def go(ks: Fake) -> None:
        ks.discovery = {"issuer": S.url, "jwks_uri": "http://issuer.test/jwks"}
        await ks.refresh(POLICY)()
        assert ks.keys(POLICY) is None
        assert ks.fetched == [S.url + DISCOVERY]  # the JWKS was never asked for

    run(go(Fake()))
