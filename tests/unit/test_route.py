"""proxy/route.py, table-tested: (request head, identity, runtime) -> a Route or a typed refusal.

The runtime is compiled from a real config (``build_runtime``), the identities are the config's
clients, so each row reads as "this client asks for this target through this listener"."""

from __future__ import annotations

import textwrap

import pytest

from egressgate.config.loader import load_config_text
from egressgate.errors import AddressProhibited, ClientProtocolError, EgressUnverified, PolicyDenied
from egressgate.http1.parse import RequestHead
from egressgate.policy.clients import Identity
from egressgate.policy.guard import OwnListeners
from egressgate.proxy.build import build_runtime
from egressgate.proxy.route import cached_addresses, clip, route

CONFIG = textwrap.dedent("""\
    probe: {echo_url: "http://127.0.0.1:9/ip"}
    egress:
      default: {direct: {}}
      px: {bind: [127.0.0.2, 127.0.0.3], pick: round_robin}
      sticky: {bind: [127.0.0.2, 127.0.0.3], pick: sticky}
      attested: {bind: [127.0.0.4], expect_ip: [203.0.113.10]}
      chained: {upstream: ["http://127.0.0.5:3128"]}
    clients:
      - name: open
        from: [10.0.0.0/16]
        egress: [default, px, sticky, attested, chained]
      - name: narrow
        from: [10.1.0.0/16]
        egress: [px]
        allow: ["api.example.com", "93.184.216.0/24"]
        deny: ["bad.example.com"]
      - name: reporter
        from: [10.2.0.0/16]
        mode: report
        allow: ["api.example.com"]
""")
RT = build_runtime(load_config_text(CONFIG), "0" * 64, "c.yaml")
OWN = OwnListeners()


def head(target: str, method: str = "GET", profile: bytes | None = None) -> RequestHead:
    return RequestHead(method, target, "HTTP/1.1", [], True, None, False, 0, profile=profile)


def who(name: str, requested: str | None = None) -> Identity:
    return Identity(RT.clients.by_name[name], requested)


PASS = [
    # (id, client, requested profile, target, connect, listener default, profile, members, addresses)
    ("connect-name-default-profile", "open", None, "api.example.com:443", True, "default", "default",
     ["direct"], None),
    ("http-absolute-uri", "open", None, "http://api.example.com:8080/x?q=1", False, "default", "default",
     ["direct"], None),
    ("ip-literal-judged-at-once", "open", None, "93.184.216.34:443", True, "default", "default", ["direct"],
     ("93.184.216.34",)),
    ("user-plus-profile", "open", "px", "api.example.com:443", True, "default", "px",
     ["127.0.0.2", "127.0.0.3"], None),
    ("listener-default-not-allowed-falls-to-client-first", "narrow", None, "api.example.com:443", True,
     "default", "px", ["127.0.0.2", "127.0.0.3"], None),
    ("chained-ip-literal-not-dialed-here", "open", "chained", "93.184.216.34:443", True, "default",
     "chained", ["http://127.0.0.5:3128"], None),
    ("allow-cidr-on-literal", "narrow", None, "93.184.216.34:443", True, "default", "px",
     ["127.0.0.2", "127.0.0.3"], ("93.184.216.34",)),
    ("report-mode-lets-a-miss-through", "reporter", None, "other.example.com:443", True, "default",
     "default", ["direct"], None),
]


@pytest.mark.parametrize("name,requested,target,connect,default,profile,members,addresses",
                         [c[1:] for c in PASS], ids=[c[0] for c in PASS])
def test_route_passes(name, requested, target, connect, default, profile, members, addresses) -> None:
    r = route(head(target, "CONNECT" if connect else "GET"), connect, who(name, requested), RT, default, OWN)
    assert r.pool.name == profile
    assert sorted(p.label for p in r.plans) == sorted(members)
    assert r.addresses == addresses
    assert r.ready == (addresses is not None or r.chained)
    assert (r.target is None) == connect


REFUSED = [
    # (id, client, requested, target, connect, error type, reason)
    ("connect-port-not-allowed", "open", None, "api.example.com:22", True, PolicyDenied,
     "connect_port_not_allowed"),
    ("not-in-allow", "narrow", None, "www.example.com:443", True, PolicyDenied, "destination_not_allowed"),
    ("denied-name", "narrow", None, "bad.example.com:443", True, PolicyDenied, "destination_denied"),
    ("profile-not-allowed", "narrow", "chained", "api.example.com:443", True, PolicyDenied,
     "profile_not_allowed"),
    ("unknown-profile", "open", "nope", "api.example.com:443", True, PolicyDenied, "profile_not_allowed"),
    ("loopback-literal", "open", None, "127.0.0.1:443", True, AddressProhibited, "destination_ip_prohibited"),
    ("metadata-name", "open", None, "http://metadata.google.internal/computeMetadata/v1/", False,
     AddressProhibited, "destination_ip_prohibited"),
    ("metadata-literal-http", "open", None, "http://169.254.169.254/latest/meta-data/", False,
     AddressProhibited, "destination_ip_prohibited"),
    ("unattested-profile-fails-closed", "open", "attested", "api.example.com:443", True, EgressUnverified,
     None),
    ("whoami-over-connect", "open", None, "egressgate.whoami:443", True, ClientProtocolError,
     "whoami_over_connect"),
    ("relative-target-as-proxy-request", "open", None, "/index.html", False, ClientProtocolError, None),
]


@pytest.mark.parametrize("name,requested,target,connect,kind,reason",
                         [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_route_refuses(name, requested, target, connect, kind, reason) -> None:
    with pytest.raises(kind) as caught:
        route(head(target, "CONNECT" if connect else "GET"), connect, who(name, requested), RT, "default", OWN)
    if reason is not None:
        assert caught.value.reason == reason


def test_whoami_is_answered_by_the_gateway_whatever_the_policy() -> None:
    r = route(head("http://egressgate.whoami/"), False, who("narrow"), RT, "default", OWN)
    assert r.whoami and r.pool is None and r.plans == []


def test_the_header_names_the_profile_when_the_username_does_not() -> None:
    r = route(head("api.example.com:443", "CONNECT", profile=b" px "), True, who("open"), RT, "default", OWN)
    assert r.pool.name == "px"
    r = route(head("api.example.com:443", "CONNECT", profile=b"px"), True, who("open", "sticky"), RT, "default",
              OWN)
    assert r.pool.name == "sticky"  # user+profile wins over the header


def test_a_round_robin_pool_advances_once_per_request_and_sticky_never() -> None:
    first = [route(head("api.example.com:443", "CONNECT"), True, who("open", "px"), RT, "default", OWN).plans[0]
             for _ in range(4)]
    assert [p.source for p in first] == ["127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.3"] or \
        [p.source for p in first] == ["127.0.0.3", "127.0.0.2", "127.0.0.3", "127.0.0.2"]
    sticky = {route(head("api.example.com:443", "CONNECT"), True, who("open", "sticky"), RT, "default",
                    OWN).plans[0].source for _ in range(4)}
    assert len(sticky) == 1


def test_a_name_is_judged_from_the_cache_or_waits_for_a_lookup() -> None:
    r = route(head("api.example.com:443", "CONNECT"), True, who("open"), RT, "default", OWN)
    assert not r.ready
    assert cached_addresses(r, lambda host: None, RT, OWN) is False and not r.ready
    assert cached_addresses(r, lambda host: ["10.0.0.1", "93.184.216.34"], RT, OWN) is True
    assert r.addresses == ("93.184.216.34",)  # the private address is never dialed
    bad = route(head("evil.example.com:443", "CONNECT"), True, who("open", "px"), RT, "default", OWN)
    with pytest.raises(AddressProhibited) as caught:
        cached_addresses(bad, lambda host: ["127.0.0.1"], RT, OWN)
    assert caught.value.profile == "px"  # the refusal names the profile it was refused under


def test_a_client_supplied_profile_name_is_bounded_in_the_refusal() -> None:
    with pytest.raises(PolicyDenied) as caught:
        route(head("api.example.com:443", "CONNECT"), True, who("open", "p" * 500), RT, "default", OWN)
    assert len(caught.value.profile) <= 70 and caught.value.profile == clip("p" * 500)
    assert "p" * 100 not in str(caught.value)
