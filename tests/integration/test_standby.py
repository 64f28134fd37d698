"""Standby members and ``switch: auto`` (issue 26), against a real gateway on loopback:
127.0.0.2 / 127.0.0.3 / 127.0.0.4 are distinct members, a loopback provider refuses by source
address and changes its mind mid-test, an IP-echo service reports each member's "public" IP
(and can be told a member's NAT IP changed), and the echo server carries a tunnel opened
before every switch."""

from __future__ import annotations

import json

import pytest
import yaml

from .conftest import curl
from .peers import Allowlist, HTTPPeer, QuietHandler, base_config, open_tunnel, wait_for
from .test_providers import _get, _ip, _reload_to, _roundtrip, _verify
from .test_status_page import parse_dom, render


class EchoIP(HTTPPeer):
    """An IP-echo service: answers each source address with its "public" IP -- itself, unless
    ``nat`` maps it to another (the member's NAT IP changed under it)."""

    def __init__(self) -> None:
        self.nat: dict[str, str] = {}
        owner = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                body = owner.nat.get(self.client_address[0], self.client_address[0]).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(Handler)
        self.url = f"http://127.0.0.1:{self.port}/ip"


@pytest.fixture
def provider():
    p = Allowlist("127.0.0.2", "127.0.0.3")
    yield p
    p.close()


@pytest.fixture
def echo_ip():
    e = EchoIP()
    yield e
    e.close()


def _config(provider, echo_port: int, bind: list[str], standby: list[str], echo_url: str | None = None,
            interval: str = "0.3s", **profile) -> dict:
    cfg = base_config(
        egress={"vendor": {"bind": bind, "standby": standby, "switch": "verified",
                           "providers": [{"name": "vendor-api", "url": provider.url, "interval": interval,
                                          "timeout": "1s", "required": True}],
                           **profile}},
        clients=[{"name": "job", "from": ["127.0.0.0/8"], "egress": ["vendor"]}],
        security={"connect_ports": [443, echo_port], "allow_private": ["127.0.0.0/8"]},
    )
    if echo_url is not None:
        cfg["probe"] = {"echo_url": echo_url, "interval": "0.3s", "retry": "0.3s"}
    return cfg


def _profile(gw) -> dict:
    return json.loads(_get(gw.admin + "/status")[1])["profiles"]["vendor"]


def _checks(gw) -> dict:
    return {c["member"]: c for c in _profile(gw)["providers"]["checks"]}


def _metrics(gw) -> str:
    return _get(gw.admin + "/metrics")[1].decode()


def test_standby_is_attested_and_checked_but_carries_no_traffic(start_gateway, provider, echo, echo_ip, origin,
                                                                tmp_path):
    cfg = _config(provider, echo.port, ["127.0.0.2"], ["127.0.0.3"], echo_ip.url,
                  expect_ip=["127.0.0.2", "127.0.0.3"])
    gw = start_gateway(cfg)

    def both_checked():
        checks = _checks(gw)
        return checks if {m for m, c in checks.items() if c["ok"]} == {"127.0.0.2", "127.0.0.3"} else None

    checks = wait_for(both_checked, "the active and the standby member accepted")
    assert (checks["127.0.0.2"]["role"], checks["127.0.0.3"]["role"]) == ("active", "standby")
    assert checks["127.0.0.3"]["egress_addr"] == "127.0.0.3"  # the check left from the standby's own address
    def attested():
        p = _profile(gw)
        return p if len(p["attestation"]) == 2 and all(a["attested"] for a in p["attestation"]) else None

    profile = wait_for(attested, "both members attested")
    assert profile["members"] == ["127.0.0.2"] and profile["standby"] == ["127.0.0.3"]
    assert profile["carrying"] == ["127.0.0.2"] and profile["failover"] is None
    standby = next(a for a in profile["attestation"] if a["member"] == "127.0.0.3")
    assert standby["role"] == "standby" and standby["observed_ip"] == "127.0.0.3"
    # no job traffic leaves from the standby
    assert {_ip(gw, origin) for _ in range(5)} == {b"127.0.0.2"}
    assert not [r for r in gw.log if r.get("egress_addr") == "127.0.0.3"]
    metrics = _metrics(gw)
    assert 'egressgate_egress_member_carrying{member="127.0.0.2",profile="vendor",role="active"} 1.0' in metrics
    assert 'egressgate_egress_member_carrying{member="127.0.0.3",profile="vendor",role="standby"} 0.0' in metrics
    assert 'egressgate_provider_reachable{member="127.0.0.3",profile="vendor",provider="vendor-api"} 1.0' in metrics
    # the status page marks the standby's row
    rows = {r[1].text: r for r in parse_dom(render(gw.admin + "/", tmp_path)).tables["providers"]}
    assert rows["127.0.0.3 (standby)"][3].text == "OK", list(rows)
    # egressgate verify checks the standby too, and says which it is
    path = tmp_path / "candidate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    provider.allowed.discard("127.0.0.3")
    r = _verify(path, "--json")
    got = {d["member"]: d for d in map(json.loads, r.stdout.splitlines())}
    assert r.returncode == 1 and got["127.0.0.3"]["role"] == "standby", r.stdout + r.stderr
    assert got["127.0.0.3"]["outcome"] == "http_status" and got["127.0.0.2"]["ok"] is True
    table = _verify(path)
    assert "127.0.0.3 (standby)" in table.stdout and "FAIL http_status" in table.stdout, table.stdout


def test_promotion_waits_for_the_provider_then_switches_with_the_tunnel_kept(start_gateway, provider, echo, origin):
    provider.allowed = {"127.0.0.2"}
    gw = start_gateway(_config(provider, echo.port, ["127.0.0.2"], ["127.0.0.3"]))
    wait_for(lambda: _checks(gw).get("127.0.0.3", {}).get("ok") is False, "the provider refusing the standby")
    s = open_tunnel(gw, f"127.0.0.1:{echo.port}", timeout=30)
    _roundtrip(s, b"before" * 1000)
    # promote the standby (move it to bind): held, the provider refuses it
    status, doc = _reload_to(gw, _config(provider, echo.port, ["127.0.0.3"], ["127.0.0.2"]))
    assert status == 200 and "127.0.0.3" in doc["pending_switches"]["vendor"], doc
    assert "403" in doc["pending_switches"]["vendor"]
    assert _ip(gw, origin) == b"127.0.0.2"
    _roundtrip(s, b"during" * 1000)
    # the provider accepts it: the gateway switches by itself, the tunnel keeps moving bytes
    after = len(gw.events)
    provider.allowed.add("127.0.0.3")
    done = gw.wait_event("provider_switch", after=after)
    assert done["state"] == "done" and done["new_members"] == ["127.0.0.3"], done
    assert _ip(gw, origin) == b"127.0.0.3"
    profile = _profile(gw)
    assert profile["members"] == ["127.0.0.3"] and profile["standby"] == ["127.0.0.2"], profile
    _roundtrip(s, b"after" * 1000)
    s.close()


def test_a_standby_that_passed_switches_at_once_on_promotion(start_gateway, provider, echo, origin):
    """A promoted member already checked as standby (and accepted, within the provider's
    interval) switches at the reload without another check: here the provider would not even
    answer one now (a check made during the reload would time out and hold the switch)."""
    gw = start_gateway(_config(provider, echo.port, ["127.0.0.2"], ["127.0.0.3"], interval="60s"))
    wait_for(lambda: _checks(gw).get("127.0.0.3", {}).get("ok") is True, "the standby accepted")
    provider.stalled.add("127.0.0.3")
    status, doc = _reload_to(gw, _config(provider, echo.port, ["127.0.0.3"], ["127.0.0.2"], interval="60s"))
    assert status == 200 and "pending_switches" not in doc, doc
    assert gw.wait_event("provider_switch")["state"] == "done"
    assert _ip(gw, origin) == b"127.0.0.3"
    provider.stalled.clear()


def test_auto_failover_moves_new_connections_and_keeps_the_open_tunnel(start_gateway, provider, echo, origin):
    cfg = _config(provider, echo.port, ["127.0.0.2"], ["127.0.0.3", "127.0.0.4"], switch="auto", failover_after=2)
    gw = start_gateway(cfg)
    wait_for(lambda: all(c["ok"] is not None for c in _checks(gw).values()), "every member checked")
    assert _ip(gw, origin) == b"127.0.0.2"
    s = open_tunnel(gw, f"127.0.0.1:{echo.port}", timeout=30)
    _roundtrip(s, b"before" * 1000)
    # the provider blocks the active member's IP (127.0.0.4 it never allowed: the first standby takes over)
    after = len(gw.events)
    provider.allowed.discard("127.0.0.2")
    event = gw.wait_event("egress_failover", after=after)
    assert (event["profile"], event["from"], event["to"]) == ("vendor", ["127.0.0.2"], "127.0.0.3"), event
    assert (event["provider"], event["outcome"], event["failover_after"]) == ("vendor-api", "http_status", 2)
    assert "403" in event["evidence"][0]["detail"], event
    refusals = [e for e in gw.events[after:gw.events.index(event)] if e.get("event") == "provider_check"
                and e["member"] == "127.0.0.2" and not e["ok"]]
    assert len(refusals) >= 2, refusals  # not before failover_after consecutive refusals
    assert {_ip(gw, origin) for _ in range(4)} == {b"127.0.0.3"}  # new connections: the standby
    _roundtrip(s, b"during" * 1000)  # the open tunnel stays where it is
    profile = _profile(gw)
    assert profile["carrying"] == ["127.0.0.3"] and profile["failover"]["to"] == "127.0.0.3", profile
    metrics = _metrics(gw)
    assert 'egressgate_egress_failover_total{profile="vendor"} 1.0' in metrics
    assert 'egressgate_egress_member_carrying{member="127.0.0.3",profile="vendor",role="standby"} 1.0' in metrics
    assert 'egressgate_egress_member_carrying{member="127.0.0.2",profile="vendor",role="active"} 0.0' in metrics
    # the provider takes the block back: the gateway does not move back by itself
    provider.allowed.add("127.0.0.2")
    first = _checks(gw)["127.0.0.2"]["at"]
    wait_for(lambda: _checks(gw)["127.0.0.2"]["ok"] and _checks(gw)["127.0.0.2"]["at"] > first, "a passing check")
    assert _ip(gw, origin) == b"127.0.0.3"
    _roundtrip(s, b"still" * 1000)
    s.close()
    # moving back is the operator's reload
    status, doc = _reload_to(gw, cfg)
    assert status == 200, doc
    assert _ip(gw, origin) == b"127.0.0.2"
    assert _profile(gw)["failover"] is None
    assert len([e for e in gw.events if e.get("event") == "egress_failover"]) == 1


def test_no_failover_to_a_refused_standby_and_the_503_names_it(start_gateway, provider, echo, echo_ip, origin):
    """The active member's NAT IP changes (its egress-IP check fails: the profile would refuse
    everything) while the provider refuses the only standby: no failover, and the 503 says why.
    Once the provider accepts the standby it carries the traffic at once."""
    provider.allowed = {"127.0.0.2"}
    # (failover_after: 100: only "the profile would refuse everything" can move it, never the count)
    gw = start_gateway(_config(provider, echo.port, ["127.0.0.2"], ["127.0.0.3"], echo_ip.url, switch="auto",
                               expect_ip=["127.0.0.2", "127.0.0.3"], failover_after=100))
    wait_for(lambda: _checks(gw).get("127.0.0.3", {}).get("ok") is False, "the provider refusing the standby")
    assert _ip(gw, origin) == b"127.0.0.2"
    echo_ip.nat["127.0.0.2"] = "198.51.100.7"

    def refused() -> bytes | None:
        r = curl("-x", gw.url, "-w", "\n%{http_code}", origin.url("/ip"))
        return r.stdout if r.stdout.endswith(b"503") else None

    body = wait_for(refused, "the profile refusing its traffic")
    assert b"198.51.100.7" in body and b"no standby member to fail over to" in body, body
    assert b"vendor-api refuses 127.0.0.3" in body, body
    assert not [e for e in gw.events if e.get("event") == "egress_failover"]
    # the provider accepts the standby: it carries the traffic without waiting for 100 rounds
    after = len(gw.events)
    provider.allowed.add("127.0.0.3")
    event = gw.wait_event("egress_failover", after=after)
    assert event["to"] == "127.0.0.3" and event["trigger"] == "refusing" and event["outcome"] == "egress_ip_mismatch"
    assert _ip(gw, origin) == b"127.0.0.3"
