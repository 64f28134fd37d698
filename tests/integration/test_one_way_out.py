"""One way out (issue 32): every outbound connection of a running gateway is ``egress.reach``'s,
and each of its four users passes the address guard it declares.

A gateway runs in this process (``app.App``) with its one ``Reach`` replaced by a recorder
that notes (member, destination, guard) and then connects for real; the far ends are real
loopback servers (an origin that is also the echo service and the provider, an OIDC issuer
over TLS). Then:

- the proxy (``proxy.connector``): a request through the gateway -> ``JUDGED`` (the route
  judged the addresses);
- the egress-IP probe (``services.probe``): the echo URL -> ``probe.GUARD``, ``Unguarded``;
- the provider checks (``services.checks``): the provider -> the runtime's ``AddressGuard``;
- the token keys (``services.keysource``): discovery and JWKS -> ``keysource.GUARD``, ``Unguarded``.

Each answer is checked too (the recorder saw the connections that really carried them).
"""

from __future__ import annotations

import asyncio

import requests
import yaml

from egressgate.app import App
from egressgate.egress.reach import JUDGED, Reach, Unguarded
from egressgate.model import HostPort
from egressgate.policy.guard import AddressGuard
from egressgate.policy.tokens import TokenPolicy
from egressgate.proxy import connector
from egressgate.proxy.build import load_runtime_text
from egressgate.services import keysource, probe

from .oidc import Issuer
from .peers import Origin, base_config


class Recorder(Reach):
    """The gateway's ``Reach``, noting every connection asked of it."""

    __slots__ = ("seen",)

    def __init__(self, reach: Reach) -> None:
        super().__init__(reach.dialer, reach.resolve)
        self.seen: list[tuple[str, str, object]] = []  # (member label, destination, guard)

    async def open(self, member, dest, guard, timeout, *args, **kwargs):
        self.seen.append((member.label, str(dest), guard))
        return await super().open(member, dest, guard, timeout, *args, **kwargs)


async def _until(predicate, what: str, timeout: float = 20.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not (found := predicate()):
        assert asyncio.get_running_loop().time() < deadline, f"no {what} within {timeout:g}s"
        await asyncio.sleep(0.02)
    return found


def test_every_user_goes_out_through_reach_with_the_guard_it_declares(ca, ca_file) -> None:
    origin = Origin()
    issuer = Issuer(ca)
    cfg = base_config(
        egress={"vendor": {"bind": ["127.0.0.2"], "providers": [
            {"name": "origin", "url": origin.url("/ip"), "accept": [200]}]}},
        probe={"echo_url": origin.url("/ip")},
        clients=[{"name": "job", "from": ["127.0.0.0/8"], "egress": ["vendor"]}])
    runtime, _ = load_runtime_text(None, yaml.safe_dump(cfg).encode())
    policy = TokenPolicy(issuer=issuer.url, audiences=("egressgate",), accounts=("a/b",), source=issuer.url,
                         ca_file=ca_file)

    async def go() -> None:
        app = App(None, runtime)
        rec = app.gateway.connector.reach = Recorder(app.gateway.connector.reach)
        await app.start(admin=False, signals=False)
        try:
            address = app.gateway.listeners.bound_addresses()[0]
            proxies = {"http": f"http://{address}"}
            answer = await asyncio.to_thread(requests.get, origin.url("/ip?t=proxy"), proxies=proxies, timeout=10)
            assert answer.status_code == 200 and answer.text.strip() == "127.0.0.2", answer.text
            await app.keys.refresh(policy)()
            assert set(app.keys.keys(policy) or ()) == {"k1", "e1"}
            seen = await _until(lambda: [s for s in rec.seen if isinstance(s[2], AddressGuard)] and rec.seen,
                                "provider check")
            checked = await _until(lambda: app.gateway.runtime.providers.result("vendor", "127.0.0.2", "origin"),
                                   "provider result")
            assert checked.ok, checked
            pool = app.gateway.runtime.profiles["vendor"]
            await _until(lambda: pool.observed_at, "egress-IP observation")
        finally:
            await app.close()
        dest = str(HostPort("127.0.0.1", origin.port))
        by_guard = {}
        for label, where, guard in seen:
            by_guard.setdefault(type(guard).__name__, set()).add((label, where, guard))
        assert ("127.0.0.2", dest, connector.GUARD) in by_guard["Judged"]  # the proxy: the route judged
        assert connector.GUARD is JUDGED
        assert ("127.0.0.2", dest, probe.GUARD) in by_guard["Unguarded"]  # the probe: operator's echo URL
        assert ("127.0.0.2", dest, app.gateway.runtime.guard) in by_guard["AddressGuard"]  # the checks
        issuer_dest = str(HostPort.parse_authority(issuer.url.split("//", 1)[1]))
        assert (keysource.MEMBER.label, issuer_dest, keysource.GUARD) in by_guard["Unguarded"]  # the token keys
        assert isinstance(probe.GUARD, Unguarded) and isinstance(keysource.GUARD, Unguarded)
        assert set(by_guard) == {"Judged", "Unguarded", "AddressGuard"}, by_guard

    try:
        asyncio.run(go())
    finally:
        origin.close()
        issuer.close()
