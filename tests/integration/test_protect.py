"""Shared-IP protection (``egress.<profile>.protect``): limits per (egress member x protected
destination) across all clients, and origin Retry-After holds. Two clients (two source
addresses) share one egress member (source address 127.0.0.2); the providers are real
loopback servers."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request

import pytest
import requests

from .dnsserver import DnsServer
from .peers import (
    EchoServer,
    HTTPPeer,
    QuietHandler,
    asked_answer,
    base_config,
    connect,
    open_tunnel,
    read_head,
    wait_for,
)

MEMBER = "127.0.0.2"  # the egress source address both jobs share
JOB_A, JOB_B = "127.0.0.5", "127.0.0.6"  # the two jobs' own addresses


class Provider(HTTPPeer):
    """A loopback provider: ``/wait`` answers only once ``release`` is set (a request held in
    flight), ``/answer?code=N&retry_after=V`` answers N with that Retry-After, anything else
    200. Every request is remembered (path, source address)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.seen: list[tuple[str, str]] = []
        self.arrived = threading.Event()
        self.release = threading.Event()
        provider = self

        class Handler(QuietHandler):
            wbufsize = 65536  # one write per answer (no delayed-ACK stall between head and body)

            def do_GET(self) -> None:
                path, q = self.query()
                provider.seen.append((path, self.client_address[0]))
                status, extra = asked_answer(q) if path == "/answer" else (200, {})
                if path == "/wait":
                    provider.arrived.set()
                    provider.release.wait(30)
                self.reply(status, f"{status} from {self.client_address[0]}\n".encode(), extra)

        super().__init__(Handler, host)

    def close(self) -> None:
        self.release.set()
        super().close()


@pytest.fixture
def provider():
    p = Provider()
    yield p
    p.close()


@pytest.fixture(scope="module")
def echo_server():
    e = EchoServer()
    yield e
    e.close()


def _config(protect: list[dict], connect_ports: list[int] = (), **extra) -> dict:
    return base_config(
        **extra,
        security={"allow_private": ["127.0.0.0/8"], "connect_ports": list(connect_ports) or [443]},
        egress={"default": {"direct": {}}, "shared": {"bind": [MEMBER], "protect": protect}},
        clients=[{"name": "job-a", "from": [f"{JOB_A}/32"], "egress": ["shared"]},
                 {"name": "job-b", "from": [f"{JOB_B}/32"], "egress": ["shared"]},
                 {"name": "ops", "from": ["127.0.0.1/32"], "egress": ["shared"]}])


def _exchange(source: str, gw, request: bytes) -> bytes:
    """One request from ``source``; the answer's head and body (one response, length-framed)."""
    with connect(gw.address, source, timeout=10) as s:
        s.sendall(request)
        data = b""
        while True:
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                if len(body) >= length:
                    return data
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk


def _status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


def _header(resp: bytes, name: str) -> str | None:
    for line in resp.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name.lower().encode():
            return v.strip().decode()
    return None


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # (never an environment proxy)


def _admin(gw, path: str):
    with _opener.open(gw.admin + path, timeout=5) as r:
        body = r.read().decode()
    return json.loads(body) if path == "/status" else body


def _metric(gw, name: str, **labels) -> float | None:
    for line in _admin(gw, "/metrics").splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_concurrent_tunnels_across_two_clients_sharing_a_member(start_gateway, echo_server):
    """max_concurrent counts both jobs' tunnels through the shared member together; the third
    is refused with 429, Retry-After and the limit named; a tunnel that ends frees its place;
    a destination the rule does not name is not limited; open tunnels keep working."""
    dest = f"127.0.0.1:{echo_server.port}"
    gw = start_gateway(_config([{"name": "echo-provider", "destinations": ["127.0.0.1"], "max_concurrent": 2}],
                               [echo_server.port]))
    first = open_tunnel(gw, dest, source=JOB_A)
    second = open_tunnel(gw, dest, source=JOB_B)
    refused = _exchange(JOB_A, gw, f"CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n".encode())
    assert _status(refused) == 429
    assert _header(refused, "Retry-After") == "1"
    proxy_status = _header(refused, "Proxy-Status")
    assert "error=connection_limit_reached" in proxy_status
    assert "max_concurrent 2" in proxy_status and "echo-provider" in proxy_status and MEMBER in proxy_status
    rec = gw.wait_log(lambda r: r["status"] == 429)
    assert rec["client"] == "job-a" and rec["reason"] == "egress_concurrency_limit" and rec["profile"] == "shared"
    # not named by the rule: not limited
    other = open_tunnel(gw, f"localhost:{echo_server.port}", source=JOB_B)
    other.close()
    # the tunnels admitted still carry bytes
    second.sendall(b"ping")
    assert second.recv(4) == b"ping"
    first.close()
    gw.wait_log(lambda r: r["method"] == "CONNECT" and r["status"] == 200 and r["client"] == "job-a")
    third = open_tunnel(gw, dest, source=JOB_A)
    third.sendall(b"pong")
    assert third.recv(4) == b"pong"
    view = _admin(gw, "/status")["profiles"]["shared"]["protect"]
    member = view["rules"][0]["members"][MEMBER]
    assert member["in_flight"] == 2 and member["refused"]["concurrency"] == 1
    assert _metric(gw, "egressgate_protect_refused_total", profile="shared", member=MEMBER,
                   destination="echo-provider", limit="concurrency") == 1
    assert _metric(gw, "egressgate_protect_in_flight", profile="shared", member=MEMBER,
                   destination="echo-provider") == 2
    for s in (second, third):
        s.close()
    wait_for(lambda: _metric(gw, "egressgate_protect_in_flight", profile="shared", member=MEMBER,
                             destination="echo-provider") == 0, "every tunnel's place freed")


def test_concurrent_plain_http_requests_across_two_clients(start_gateway, provider):
    """A forwarded request counts while it is in flight: job B is refused while job A's request
    waits for its answer, admitted once it is answered."""
    gw = start_gateway(_config([{"name": "p", "destinations": ["127.0.0.1"], "max_concurrent": 1}]))
    url = f"http://127.0.0.1:{provider.port}"
    answers: list[bytes] = []
    waiting = threading.Thread(target=lambda: answers.append(
        _exchange(JOB_A, gw, f"GET {url}/wait HTTP/1.1\r\nHost: x\r\n\r\n".encode())))
    waiting.start()
    assert provider.arrived.wait(10)
    refused = _exchange(JOB_B, gw, f"GET {url}/now HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert _status(refused) == 429 and _header(refused, "Retry-After") == "1"
    assert "max_concurrent 1" in _header(refused, "Proxy-Status")
    assert ("/now", MEMBER) not in provider.seen  # the provider never saw it
    provider.release.set()
    waiting.join(10)
    assert _status(answers[0]) == 200
    ok = _exchange(JOB_B, gw, f"GET {url}/now HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert _status(ok) == 200 and ok.endswith(f"from {MEMBER}\n".encode())


def test_rate_limit_across_two_clients_plain_http_and_connect(start_gateway, provider, echo_server):
    """max_per_second is one bucket per (member x rule) for every client and both kinds of
    request: job A's request takes the only token, job B's request and tunnel are refused
    with the seconds until the next token."""
    gw = start_gateway(_config([{"name": "slow-provider", "destinations": ["127.0.0.1"], "max_per_second": 0.01}],
                               [echo_server.port]))
    url = f"http://127.0.0.1:{provider.port}/x"
    assert _status(_exchange(JOB_A, gw, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())) == 200
    refused = _exchange(JOB_B, gw, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert _status(refused) == 429
    assert 1 < int(_header(refused, "Retry-After")) <= 100
    assert "max_per_second 0.01" in _header(refused, "Proxy-Status")
    dest = f"127.0.0.1:{echo_server.port}"
    tunnel = _exchange(JOB_B, gw, f"CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n".encode())
    assert _status(tunnel) == 429 and b"Egress Rate Limit" in tunnel.split(b"\r\n", 1)[0]
    assert gw.wait_log(lambda r: r["status"] == 429 and r["method"] == "CONNECT")["reason"] == "egress_rate_limit"
    assert _metric(gw, "egressgate_protect_refused_total", profile="shared", member=MEMBER,
                   destination="slow-provider", limit="rate") == 2
    assert _metric(gw, "egressgate_protect_admitted_total", profile="shared", member=MEMBER,
                   destination="slow-provider") == 1


def test_a_protect_refusal_names_the_member_and_the_rule_in_its_record(start_gateway, provider, echo_server):
    """Defect (issue 29 item 3): a protect refusal's record carried egress_addr "-" and neither
    the rule nor the member, so for a multi-member profile nobody could say which IP hit its
    limit."""
    gw = start_gateway(_config([{"name": "slow-provider", "destinations": ["127.0.0.1"], "max_per_second": 0.01}],
                               [echo_server.port]))
    url = f"http://127.0.0.1:{provider.port}/x"
    assert _status(_exchange(JOB_A, gw, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())) == 200
    assert _status(_exchange(JOB_B, gw, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())) == 429
    rec = gw.wait_log(lambda r: r["status"] == 429)
    assert (rec["client"], rec["profile"], rec["egress_addr"], rec["protect_rule"], rec["reason"]) == \
        ("job-b", "shared", MEMBER, "slow-provider", "egress_rate_limit")


def test_retry_after_hold(start_gateway, provider, echo_server):
    """An origin's 429 with Retry-After holds (member x host), capped by max_hold: other jobs'
    requests and tunnels to that host are answered locally with 429 and the remaining
    Retry-After, never reaching the provider, nor by its address; /status, whoami,
    the metrics and a protect_hold event show the hold."""
    gw = start_gateway(_config([{"name": "vendor", "destinations": ["localhost", "127.0.0.1"], "max_hold": "30s"}],
                               [echo_server.port]))
    held_url = f"http://localhost:{provider.port}"
    first = _exchange(JOB_A, gw, f"GET {held_url}/answer?code=429&retry_after=120 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert _status(first) == 429 and _header(first, "Retry-After") == "120"  # the origin's own answer
    event = gw.wait_event("protect_hold")
    assert event["host"] == "localhost" and event["member"] == MEMBER and event["seconds"] == 30
    seen = len(provider.seen)
    local = _exchange(JOB_B, gw, f"GET {held_url}/other HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert _status(local) == 429 and 0 < int(_header(local, "Retry-After")) <= 30
    assert "localhost answered 429 with Retry-After" in _header(local, "Proxy-Status")
    dest = f"localhost:{echo_server.port}"
    assert _status(_exchange(JOB_B, gw, f"CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n".encode())) == 429
    assert len(provider.seen) == seen
    same = requests.get(f"http://127.0.0.1:{provider.port}/fine", timeout=10,
                        proxies={"http": gw.url})  # (from 127.0.0.1: the ops client)
    assert same.status_code == 429  # the same origin by its address: held too
    assert "127.0.0.1 (as localhost) answered 429" in same.headers["Proxy-Status"]
    assert len(provider.seen) == seen
    holds = _admin(gw, "/status")["profiles"]["shared"]["protect"]["holds"]
    assert [(h["host"], h["address"], h["member"], h["rule"], h["status"]) for h in holds] == [
        ("localhost", "127.0.0.1", MEMBER, "vendor", 429)]
    doc = requests.get("http://egressgate.whoami/", proxies={"http": gw.url}, timeout=10).json()
    assert doc["protect"]["holds"][0]["host"] == "localhost"
    assert doc["protect"]["rules"][0]["members"][MEMBER]["refused"]["hold"] == 3
    assert _metric(gw, "egressgate_protect_held_hosts", profile="shared", member=MEMBER, destination="vendor") == 1
    assert _metric(gw, "egressgate_protect_holds_started_total", profile="shared", member=MEMBER,
                   destination="vendor") == 1
    assert "localhost" not in "".join(line for line in _admin(gw, "/metrics").splitlines()
                                      if line.startswith("egressgate_protect"))


def test_503_without_retry_after_and_unprotected_hosts_hold_nothing(start_gateway, provider):
    gw = start_gateway(_config([{"name": "vendor", "destinations": ["localhost"]}]))
    for host in ("localhost", "127.0.0.1"):  # a 503 with no Retry-After; a 429 from a host no rule names
        code = "503" if host == "localhost" else "429&retry_after=60"
        url = f"http://{host}:{provider.port}/answer?code={code}"
        assert _status(_exchange(JOB_A, gw, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())) in (503, 429)
        again = _exchange(JOB_B, gw, f"GET http://{host}:{provider.port}/x HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert _status(again) == 200
    assert _admin(gw, "/status")["profiles"]["shared"]["protect"]["holds"] == []


def test_unconfigured_profile_shows_no_protection(start_gateway, provider):
    gw = start_gateway(base_config(security={"allow_private": ["127.0.0.0/8"]}))
    doc = requests.get("http://egressgate.whoami/", proxies={"http": gw.url}, timeout=10).json()
    assert doc["protect"] is None
    assert _admin(gw, "/status")["profiles"]["default"]["protect"] is None
    assert requests.get(f"http://127.0.0.1:{provider.port}/x", proxies={"http": gw.url}, timeout=10).status_code == 200
    assert "egressgate_protect_admitted_total{" not in _admin(gw, "/metrics")



def _reload(gw, config: dict) -> None:
    gw.write_config(config)
    req = urllib.request.Request(gw.admin + "/-/reload", method="POST")
    with _opener.open(req, timeout=10) as resp:
        assert json.loads(resp.read())["reloaded"] is True


def test_a_reload_changes_the_limits_and_keeps_counting_open_tunnels(start_gateway, echo_server):
    """A tunnel admitted under the old config still holds its place under the new limits (the
    count lives in the gateway, not the config), and frees it when it ends, even after the
    rule is gone."""
    dest = f"127.0.0.1:{echo_server.port}"
    cfg = _config([{"name": "p", "destinations": ["127.0.0.1"], "max_concurrent": 1}], [echo_server.port])
    gw = start_gateway(cfg)
    old = open_tunnel(gw, dest, source=JOB_A)
    connect = f"CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n".encode()
    assert _status(_exchange(JOB_B, gw, connect)) == 429
    cfg["egress"]["shared"]["protect"][0]["max_concurrent"] = 2
    _reload(gw, cfg)
    new = open_tunnel(gw, dest, source=JOB_B)  # the second of two places
    assert _status(_exchange(JOB_B, gw, connect)) == 429  # the old tunnel still counts
    old.sendall(b"still here")
    assert old.recv(10) == b"still here"
    cfg["egress"]["shared"]["protect"] = []
    _reload(gw, cfg)
    assert _admin(gw, "/status")["profiles"]["shared"]["protect"] is None
    for s in (old, new):
        s.close()
    wait_for(lambda: _metric(gw, "egressgate_protect_in_flight", profile="shared", member=MEMBER,
                             destination="p") == 0, "both tunnels' places freed after the rule was removed")


def test_a_failover_to_another_member_counts_there(start_gateway, echo_server):
    """The first member's address cannot be bound: the connector falls over to the second, and
    the tunnel counts against the member it really leaves from (not the one tried first)."""
    dest = f"127.0.0.1:{echo_server.port}"
    cfg = _config([{"name": "p", "destinations": ["127.0.0.1"], "max_concurrent": 1}], [echo_server.port])
    cfg["egress"]["shared"].update(bind=["10.99.99.99", MEMBER], pick="failover")
    gw = start_gateway(cfg)
    tunnel = open_tunnel(gw, dest, source=JOB_A)
    gw.wait_event("egress_source_down")
    members = _admin(gw, "/status")["profiles"]["shared"]["protect"]["rules"][0]["members"]
    assert (members["10.99.99.99"]["in_flight"], members[MEMBER]["in_flight"]) == (0, 1)
    refused = _exchange(JOB_B, gw, f"CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n".encode())
    assert _status(refused) == 429 and f"egress {MEMBER})" in _header(refused, "Proxy-Status")
    tunnel.close()


# --- holds no client can lift (issue 25, items 4 and 5) ---------------------------------------

def _get(session: requests.Session, gw, url: str) -> requests.Response:
    return session.get(url, proxies={"http": gw.url}, timeout=10)


def _session_from(source: str) -> requests.Session:
    """A keep-alive session whose connections to the gateway leave from ``source``."""
    from requests.adapters import HTTPAdapter

    class Bound(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            kwargs["source_address"] = (source, 0)
            super().init_poolmanager(*args, **kwargs)

        def proxy_manager_for(self, proxy, **kwargs):
            kwargs["source_address"] = (source, 0)
            return super().proxy_manager_for(proxy, **kwargs)

    s = requests.Session()
    s.trust_env = False
    s.mount("http://", Bound())
    return s


FLOOD = 4200  # more holds than a process kept in all (4,096) before holds were bounded per client


def test_a_flood_of_holds_from_hosts_one_client_controls_does_not_lift_anothers(start_gateway, provider):
    """Job A's provider answered 429 Retry-After: 120 (a hold). Job B makes FLOOD names it
    controls answer 429 Retry-After: 300, with the default bounds. Job A's provider stays held:
    nobody reaches it until the hold ends. (Before: the table's 4,096 places filled up and the
    hold ending soonest -- job A's -- was dropped.)"""
    evil = Provider("127.0.0.3")
    names = {f"h{i}.evil.test": ["127.0.0.3"] for i in range(FLOOD)}
    try:
        with DnsServer({"real.test": ["127.0.0.1"], **names}) as dns:
            gw = start_gateway(_config([{"name": "vendors", "destinations": ["*.test"], "max_hold": "10m"}],
                                       dns={"servers": [dns.address]}))
            victim, attacker = _session_from(JOB_A), _session_from(JOB_B)
            held = f"http://real.test:{provider.port}"
            assert _get(victim, gw, f"{held}/answer?code=429&retry_after=120").status_code == 429
            gw.wait_event("protect_hold")
            assert _get(victim, gw, f"{held}/again").status_code == 429  # held locally
            seen = len(provider.seen)
            statuses = {}
            for name in names:
                r = _get(attacker, gw, f"http://{name}:{evil.port}/answer?code=429&retry_after=300")
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert statuses == {429: FLOOD}
            again = _get(victim, gw, f"{held}/after-the-flood")
            assert again.status_code == 429 and "real.test answered 429" in again.headers["Proxy-Status"]
            assert len(provider.seen) == seen  # the provider saw nothing while held
            holds = _admin(gw, "/status")["profiles"]["shared"]["protect"]["holds"]
            assert len(holds) <= 1 + 64 and any(h["host"] == "real.test" for h in holds)
    finally:
        evil.close()


def test_holds_are_bounded_per_client_and_per_rule_and_never_evicted_by_another_client(start_gateway, provider):
    """max_holds_per_client 3, max_holds 4. Job B's origins at ten addresses answer 429: it
    keeps its 3 newest holds (its own replaced), job A's hold stays; the rule's table is then
    full (1 + 3): a third client's new hold is not recorded -- nobody's is evicted for it --
    and both drops are counted."""
    attackers = [Provider(f"127.0.1.{i}") for i in range(1, 11)]
    try:
        gw = start_gateway(_config([{"name": "vendors", "destinations": ["127.0.0.0/8"], "max_hold": "10m",
                                     "max_holds": 4, "max_holds_per_client": 3}]))
        victim, attacker, ops = _session_from(JOB_A), _session_from(JOB_B), _session_from("127.0.0.1")
        held = f"http://127.0.0.1:{provider.port}"
        assert _get(victim, gw, f"{held}/answer?code=429&retry_after=60").status_code == 429
        for a in attackers:
            assert _get(attacker, gw, f"http://{a.server.server_address[0]}:{a.port}/answer?code=429"
                                      f"&retry_after=300").status_code == 429
        seen = len(provider.seen)
        assert _get(victim, gw, f"{held}/x").status_code == 429
        assert _get(ops, gw, f"{held}/x").status_code == 429
        assert len(provider.seen) == seen
        holds = _admin(gw, "/status")["profiles"]["shared"]["protect"]["holds"]
        assert sorted(h["host"] for h in holds) == ["127.0.0.1", "127.0.1.10", "127.0.1.8", "127.0.1.9"]
        # the table is full: ops's hold is not recorded, and evicts nothing
        other = Provider("127.0.0.4")
        try:
            url = f"http://127.0.0.4:{other.port}"
            assert _get(ops, gw, f"{url}/answer?code=429&retry_after=300").status_code == 429
            gw.wait_event("protect_hold_dropped")
            assert _get(ops, gw, f"{url}/answer?code=200").status_code == 200  # not held
        finally:
            other.close()
        assert _get(victim, gw, f"{held}/x").status_code == 429
        assert len(_admin(gw, "/status")["profiles"]["shared"]["protect"]["holds"]) == 4
        assert _metric(gw, "egressgate_protect_holds_dropped_total", profile="shared", member=MEMBER,
                       destination="vendors", why="client_share") == 7
        assert _metric(gw, "egressgate_protect_holds_dropped_total", profile="shared", member=MEMBER,
                       destination="vendors", why="rule_full") == 1
    finally:
        for a in attackers:
            a.close()


def test_a_hold_learned_by_name_holds_the_address_and_its_other_names(start_gateway, provider):
    """a.test answered 429 Retry-After: job B reaching the same origin by its IP literal or by
    b.test (same address), as a forwarded request or a CONNECT, is held too; a name at
    another address is not."""
    other = Provider("127.0.0.4")
    try:
        with DnsServer({"a.test": ["127.0.0.1"], "b.test": ["127.0.0.1"], "c.test": ["127.0.0.4"]}) as dns:
            gw = start_gateway(_config([{"name": "vendor", "destinations": ["*.test", "127.0.0.1"],
                                         "max_hold": "60s"}], [provider.port], dns={"servers": [dns.address]}))
            url = f"http://a.test:{provider.port}/answer?code=429&retry_after=120"
            assert _status(_exchange(JOB_A, gw, f"GET {url} HTTP/1.1\r\nHost: a.test\r\n\r\n".encode())) == 429
            event = gw.wait_event("protect_hold")
            seen = len(provider.seen)
            for host in ("127.0.0.1", "b.test", "a.test"):
                target = f"{host}:{provider.port}"
                plain = _exchange(JOB_B, gw, f"GET http://{target}/x HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                assert _status(plain) == 429, (host, plain)
                assert "answered 429 with Retry-After" in _header(plain, "Proxy-Status")
                assert 0 < int(_header(plain, "Retry-After")) <= 60
                tunnel = _exchange(JOB_B, gw, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
                assert _status(tunnel) == 429, (host, tunnel)
            assert len(provider.seen) == seen  # the origin saw none of them
            assert (event["host"], event.get("address")) == ("a.test", "127.0.0.1")
            ok = _exchange(JOB_B, gw, f"GET http://c.test:{other.port}/x HTTP/1.1\r\nHost: c.test\r\n\r\n".encode())
            assert _status(ok) == 200
            holds = _admin(gw, "/status")["profiles"]["shared"]["protect"]["holds"]
            assert [(h["host"], h["address"]) for h in holds] == [("a.test", "127.0.0.1")]
    finally:
        other.close()


# --- the hold queue (protect[].queue) ---------------------------------------------------------

QUEUE_RULE = "queued-provider"


def _queued(gw) -> float:
    return _metric(gw, "egressgate_protect_queued", profile="shared", member=MEMBER, destination=QUEUE_RULE) or 0


def _queue_outcome(gw, outcome: str) -> float:
    return _metric(gw, "egressgate_protect_queue_total", profile="shared", member=MEMBER, destination=QUEUE_RULE,
                   outcome=outcome) or 0


def _queue_config(port: int, max_wait: str = "20s", max_queued: int = 10, connect_ports=()) -> dict:
    return _config([{"name": QUEUE_RULE, "destinations": ["127.0.0.1"], "max_concurrent": 1,
                     "queue": {"max_wait": max_wait, "max_queued": max_queued}}], connect_ports)


def _queued_get(source: str, gw, port: int, path: str) -> bytes:
    return _exchange(source, gw, f"GET http://127.0.0.1:{port}{path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                 f"Connection: close\r\n\r\n".encode())


def test_over_budget_requests_wait_and_go_in_arrival_order_across_two_clients(start_gateway, provider):
    """max_concurrent 1 with a queue: while one request is in flight, the next three (from two
    clients, arriving one after another) wait instead of a 429, then reach the provider one at a
    time in the order they arrived, each answered 200."""
    gw = start_gateway(_queue_config(provider.port))
    results: dict[str, bytes] = {}

    def send(name: str, source: str, path: str) -> threading.Thread:
        t = threading.Thread(target=lambda: results.__setitem__(name, _queued_get(source, gw, provider.port, path)))
        t.start()
        return t

    threads = [send("hold", JOB_A, "/wait")]
    assert provider.arrived.wait(10)
    for n, (name, source) in enumerate([("b1", JOB_B), ("a2", JOB_A), ("b3", JOB_B)], start=1):
        threads.append(send(name, source, f"/{name}"))
        wait_for(lambda n=n: _queued(gw) == n, f"{n} waiting in the queue")
    assert [path for path, _ in provider.seen] == ["/wait"]  # nobody went past the budget
    provider.release.set()
    for t in threads:
        t.join(30)
    assert {name: _status(resp) for name, resp in results.items()} == {"hold": 200, "b1": 200, "a2": 200, "b3": 200}
    assert [path for path, _ in provider.seen] == ["/wait", "/b1", "/a2", "/b3"]
    assert all(source == MEMBER for _, source in provider.seen)
    wait_for(lambda: _queue_outcome(gw, "admitted_after_wait") == 3, "three admitted after a wait")
    assert _queued(gw) == 0
    assert not _metric(gw, "egressgate_protect_refused_total", profile="shared", member=MEMBER,
                       destination=QUEUE_RULE, limit="concurrency")  # (a wait that ends admitted is no refusal)
    assert _metric(gw, "egressgate_protect_queue_wait_seconds_count", profile="shared", destination=QUEUE_RULE) == 3


def test_a_waiter_whose_client_goes_away_leaves_the_queue_at_once(start_gateway, provider):
    """A queued request whose client disconnects leaves the queue (the gauge drops, counted as
    client_gone) and never reaches the provider, even once the budget frees."""
    gw = start_gateway(_queue_config(provider.port))
    holder = threading.Thread(target=lambda: _queued_get(JOB_A, gw, provider.port, "/wait"))
    holder.start()
    assert provider.arrived.wait(10)
    s = connect(gw.address, JOB_B, timeout=10)
    s.sendall(f"GET http://127.0.0.1:{provider.port}/gone HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    wait_for(lambda: _queued(gw) == 1, "the request waiting")
    s.close()
    wait_for(lambda: _queued(gw) == 0, "the waiter gone from the queue")
    assert _queue_outcome(gw, "client_gone") == 1
    provider.release.set()
    holder.join(30)
    after = _queued_get(JOB_A, gw, provider.port, "/after")  # the budget is free again
    assert _status(after) == 200
    assert [path for path, _ in provider.seen] == ["/wait", "/after"]


def test_past_max_wait_the_wait_ends_in_a_429_with_retry_after(start_gateway, provider):
    """A request still over budget when max_wait passes gets today's 429 with Retry-After and the
    limit named, counted as timed_out and as a concurrency refusal."""
    gw = start_gateway(_queue_config(provider.port, max_wait="1s"))
    holder = threading.Thread(target=lambda: _queued_get(JOB_A, gw, provider.port, "/wait"))
    holder.start()
    assert provider.arrived.wait(10)
    resp = _queued_get(JOB_B, gw, provider.port, "/late")
    assert _status(resp) == 429
    assert _header(resp, "Retry-After") == "1"
    proxy_status = _header(resp, "Proxy-Status")
    assert "max_concurrent 1" in proxy_status and "waited 1s in the queue" in proxy_status
    rec = gw.wait_log(lambda r: r["status"] == 429)
    assert rec["client"] == "job-b" and rec["reason"] == "egress_concurrency_limit"
    assert _queue_outcome(gw, "timed_out") == 1
    assert _metric(gw, "egressgate_protect_refused_total", profile="shared", member=MEMBER,
                   destination=QUEUE_RULE, limit="concurrency") == 1
    provider.release.set()
    holder.join(30)
    assert [path for path, _ in provider.seen] == ["/wait"]


def test_a_full_queue_answers_429_at_once(start_gateway, provider):
    """Past max_queued, a request over budget is refused at once (reason egress_queue_full)."""
    gw = start_gateway(_queue_config(provider.port, max_queued=1))
    threads = [threading.Thread(target=lambda: _queued_get(JOB_A, gw, provider.port, "/wait"))]
    threads[0].start()
    assert provider.arrived.wait(10)
    threads.append(threading.Thread(target=lambda: _queued_get(JOB_B, gw, provider.port, "/queued")))
    threads[1].start()
    wait_for(lambda: _queued(gw) == 1, "one waiting")
    resp = _queued_get(JOB_A, gw, provider.port, "/full")
    assert _status(resp) == 429 and "already wait" in _header(resp, "Proxy-Status")
    assert gw.wait_log(lambda r: r["status"] == 429)["reason"] == "egress_queue_full"
    assert _queue_outcome(gw, "queue_full") == 1
    provider.release.set()
    for t in threads:
        t.join(30)
    assert [path for path, _ in provider.seen] == ["/wait", "/queued"]


def test_an_over_budget_connect_waits_for_a_tunnel_to_end(start_gateway, echo_server):
    """CONNECT too: the second tunnel waits while the first is open, and gets its 200 once the
    first closes; bytes then move through it."""
    dest = f"127.0.0.1:{echo_server.port}"
    gw = start_gateway(_queue_config(echo_server.port, connect_ports=[echo_server.port]))
    first = open_tunnel(gw, dest, source=JOB_A)
    second = connect(gw.address, JOB_B, timeout=10)
    second.sendall(f"CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n".encode())
    wait_for(lambda: _queued(gw) == 1, "the second CONNECT waiting")
    first.sendall(b"ping")
    assert first.recv(4) == b"ping"
    first.close()
    head = read_head(second)
    assert head.startswith(b"HTTP/1.1 200"), head
    second.sendall(b"pong")
    assert second.recv(4) == b"pong"
    second.close()
    assert _queue_outcome(gw, "admitted_after_wait") == 1


def test_over_the_rate_requests_wait_for_the_bucket_to_refill(start_gateway, provider):
    """A queue on max_per_second: the first request takes the bucket's token, the next two
    (from two clients) wait for it to refill instead of a 429, then go one per refill in
    arrival order, each answered 200; none is refused."""
    gw = start_gateway(_config([{"name": QUEUE_RULE, "destinations": ["127.0.0.1"], "max_per_second": 0.25,
                                 "queue": {"max_wait": "20s", "max_queued": 10}}]))
    assert _status(_queued_get(JOB_A, gw, provider.port, "/first")) == 200
    results: dict[str, bytes] = {}
    threads = []
    for n, (name, source) in enumerate([("b1", JOB_B), ("a2", JOB_A)], start=1):
        t = threading.Thread(target=lambda nm=name, src=source: results.__setitem__(
            nm, _queued_get(src, gw, provider.port, f"/{nm}")))
        t.start()
        threads.append(t)
        wait_for(lambda n=n: _queued(gw) == n, f"{n} waiting for the rate")
    assert [path for path, _ in provider.seen] == ["/first"]
    for t in threads:
        t.join(30)
    assert {name: _status(resp) for name, resp in results.items()} == {"b1": 200, "a2": 200}
    assert [path for path, _ in provider.seen] == ["/first", "/b1", "/a2"]
    assert _queue_outcome(gw, "admitted_after_wait") == 2 and _queued(gw) == 0
    assert not _metric(gw, "egressgate_protect_refused_total", profile="shared", member=MEMBER,
                       destination=QUEUE_RULE, limit="rate")


def test_a_request_held_by_retry_after_waits_for_the_hold_to_end_then_goes(start_gateway, provider):
    """A queue on a rule the provider put on hold (429, Retry-After: 4): the next request waits
    in the line while the hold lasts (the provider does not see it), then goes and gets the
    provider's 200. A hold longer than max_wait is answered 429 at once (no point waiting)."""
    gw = start_gateway(_config([{"name": QUEUE_RULE, "destinations": ["127.0.0.1"], "max_hold": "60s",
                                 "queue": {"max_wait": "20s", "max_queued": 10}}]))
    first = _queued_get(JOB_A, gw, provider.port, "/answer?code=429&retry_after=4")
    assert _status(first) == 429 and _header(first, "Retry-After") == "4"
    gw.wait_event("protect_hold")
    results: list[bytes] = []
    t = threading.Thread(target=lambda: results.append(_queued_get(JOB_B, gw, provider.port, "/after")))
    t.start()
    wait_for(lambda: _queued(gw) == 1, "the request waiting for the hold")
    assert [path for path, _ in provider.seen] == ["/answer"]  # held: not sent while it waits
    t.join(30)
    assert _status(results[0]) == 200
    assert [path for path, _ in provider.seen] == ["/answer", "/after"]
    assert _queue_outcome(gw, "admitted_after_wait") == 1 and _queued(gw) == 0
    # the provider asks for longer than max_wait: 429 at once, the remaining hold as Retry-After
    long = _queued_get(JOB_A, gw, provider.port, "/answer?code=429&retry_after=50")
    assert _status(long) == 429
    wait_for(lambda: len([e for e in gw.events if e.get("event") == "protect_hold"]) == 2, "the second hold")
    refused = _queued_get(JOB_B, gw, provider.port, "/later")
    assert _status(refused) == 429 and 20 < int(_header(refused, "Retry-After")) <= 50
    assert "answered 429 with Retry-After" in _header(refused, "Proxy-Status")
    assert [path for path, _ in provider.seen] == ["/answer", "/after", "/answer"]
    assert _queue_outcome(gw, "timed_out") == 0


def test_a_waiting_connect_whose_client_goes_away_leaves_the_queue_at_once(start_gateway, echo_server):
    """A CONNECT waiting for a tunnel's slot whose client closes leaves the line at once
    (client_gone), and is never dialed: once the first tunnel ends, a new one goes through."""
    dest = f"127.0.0.1:{echo_server.port}"
    gw = start_gateway(_queue_config(echo_server.port, connect_ports=[echo_server.port]))
    dialed = len(echo_server.peers)  # (the echo server is the module's: count from here)
    first = open_tunnel(gw, dest, source=JOB_A)
    gone = connect(gw.address, JOB_B, timeout=10)
    gone.sendall(f"CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n".encode())
    wait_for(lambda: _queued(gw) == 1, "the second CONNECT waiting")
    gone.close()
    wait_for(lambda: _queued(gw) == 0, "the waiter gone from the queue")
    assert _queue_outcome(gw, "client_gone") == 1
    first.close()
    after = open_tunnel(gw, dest, source=JOB_B)
    after.sendall(b"ping")
    assert after.recv(4) == b"ping"
    after.close()
    assert len(echo_server.peers) == dialed + 2  # the first tunnel and the last: never the one that left


class _Closer:
    """An origin that accepts, reads the request head and closes without answering."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def test_every_ending_releases_its_shared_ip_admission(start_gateway, provider, echo_server):
    """Issue 32 (the protect admission is an object with its own release): however a request or
    tunnel ends, its admission is released once -- answered, the origin closing before its
    answer, the origin refusing the connection, the client leaving while it waits, a malformed
    body, a tunnel closed, a tunnel reset. With ``max_concurrent: 1`` a leaked admission shows
    as the next request's 429; the in-flight gauge is 0 after each."""
    closer = _Closer()
    refusing = socket.create_server(("127.0.0.1", 0))
    dead_port = refusing.getsockname()[1]
    refusing.close()  # nothing listens there: the dial is refused
    gw = start_gateway(_config([{"name": "p", "destinations": ["127.0.0.1"], "max_concurrent": 1}],
                               [echo_server.port]))
    url = f"http://127.0.0.1:{provider.port}"

    def in_flight() -> float | None:
        return _metric(gw, "egressgate_protect_in_flight", profile="shared", member=MEMBER, destination="p")

    def released(what: str) -> None:
        wait_for(lambda: in_flight() == 0, f"the admission released after {what}")
        ok = _exchange(JOB_B, gw, f"GET {url}/next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert _status(ok) == 200, (what, ok)
        wait_for(lambda: in_flight() == 0, f"the check request's admission released after {what}")

    try:
        # answered (keep-alive: the connection stays open, the admission does not)
        with connect(gw.address, JOB_A, timeout=10) as s:
            s.sendall(f"GET {url}/a HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            released("an answered request on a kept-alive connection")
        # the origin closes before answering: 502
        answer = _exchange(JOB_A, gw, f"GET http://127.0.0.1:{closer.port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert _status(answer) == 502, answer
        released("an origin that closed before its answer")
        # the origin refuses the connection: 502
        answer = _exchange(JOB_A, gw, f"GET http://127.0.0.1:{dead_port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert _status(answer) == 502, answer
        released("a refused dial")
        # the client leaves while its request waits for the origin
        with connect(gw.address, JOB_A, timeout=10) as s:
            s.sendall(f"GET {url}/wait HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert provider.arrived.wait(10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        gw.wait_log(lambda r: r["status"] == 499)
        provider.release.set()
        released("a client that left mid-request")
        # a malformed chunked body after the head was admitted: 400
        answer = _exchange(JOB_A, gw, f"POST {url}/post HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                      f"zz\r\n".encode())
        assert _status(answer) == 400, answer
        released("a malformed request body")
        # a tunnel closed by its client, and one reset by it
        dest = f"127.0.0.1:{echo_server.port}"
        with open_tunnel(gw, dest, source=JOB_A) as t:
            t.sendall(b"ping")
            assert t.recv(4) == b"ping"
        released("a closed tunnel")
        t = open_tunnel(gw, dest, source=JOB_A)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        t.close()
        released("a reset tunnel")
    finally:
        closer.close()
