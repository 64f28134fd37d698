"""Shared-IP protection (``egress.<profile>.protect``): limits per (egress member x protected
destination) across all clients, and origin Retry-After holds. Two clients (two source
addresses) share one egress member (source address 127.0.0.2); the providers are real
loopback servers."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from .peers import EchoServer, base_config, wait_for

MEMBER = "127.0.0.2"  # the egress source address both jobs share
JOB_A, JOB_B = "127.0.0.5", "127.0.0.6"  # the two jobs' own addresses


class Provider:
    """A loopback provider: ``/wait`` answers only once ``release`` is set (a request held in
    flight), ``/answer?code=N&retry_after=V`` answers N with that Retry-After, anything else
    200. Every request is remembered (path, source address)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.arrived = threading.Event()
        self.release = threading.Event()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                provider.seen.append((url.path, self.client_address[0]))
                status, extra = 200, {}
                if url.path == "/wait":
                    provider.arrived.set()
                    provider.release.wait(30)
                elif url.path == "/answer":
                    status = int(q["code"])
                    if "retry_after" in q:
                        extra["Retry-After"] = q["retry_after"]
                body = f"{status} from {self.client_address[0]}\n".encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


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


def _config(protect: list[dict], connect_ports: list[int] = ()) -> dict:
    return base_config(
        security={"allow_private": ["127.0.0.0/8"], "connect_ports": list(connect_ports) or [443]},
        egress={"default": {"direct": {}}, "shared": {"bind": [MEMBER], "protect": protect}},
        clients=[{"name": "job-a", "from": [f"{JOB_A}/32"], "egress": ["shared"]},
                 {"name": "job-b", "from": [f"{JOB_B}/32"], "egress": ["shared"]},
                 {"name": "ops", "from": ["127.0.0.1/32"], "egress": ["shared"]}])


def _connect_from(source: str, gw) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    s.bind((source, 0))
    s.connect((gw.host, gw.port))
    return s


def _exchange(source: str, gw, request: bytes) -> bytes:
    """One request from ``source``; the answer's head and body (one response, length-framed)."""
    with _connect_from(source, gw) as s:
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


def _tunnel(source: str, gw, dest: str) -> socket.socket:
    s = _connect_from(source, gw)
    s.sendall(f"CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    return s


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
    first = _tunnel(JOB_A, gw, dest)
    second = _tunnel(JOB_B, gw, dest)
    refused = _exchange(JOB_A, gw, f"CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n".encode())
    assert _status(refused) == 429
    assert _header(refused, "Retry-After") == "1"
    proxy_status = _header(refused, "Proxy-Status")
    assert "error=connection_limit_reached" in proxy_status
    assert "max_concurrent 2" in proxy_status and "echo-provider" in proxy_status and MEMBER in proxy_status
    rec = gw.wait_log(lambda r: r["status"] == 429)
    assert rec["client"] == "job-a" and rec["reason"] == "egress_concurrency_limit" and rec["profile"] == "shared"
    # not named by the rule: not limited
    other = _tunnel(JOB_B, gw, f"localhost:{echo_server.port}")
    other.close()
    # the tunnels admitted still carry bytes
    second.sendall(b"ping")
    assert second.recv(4) == b"ping"
    first.close()
    gw.wait_log(lambda r: r["method"] == "CONNECT" and r["status"] == 200 and r["client"] == "job-a")
    third = _tunnel(JOB_A, gw, dest)
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
    Retry-After, never reaching the provider; another host is not held; /status, whoami,
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
    other = requests.get(f"http://127.0.0.1:{provider.port}/fine", timeout=10,
                         proxies={"http": gw.url})  # (from 127.0.0.1: the ops client)
    assert other.status_code == 200
    holds = _admin(gw, "/status")["profiles"]["shared"]["protect"]["holds"]
    assert [(h["host"], h["member"], h["rule"], h["status"]) for h in holds] == [("localhost", MEMBER, "vendor", 429)]
    doc = requests.get("http://egressgate.whoami/", proxies={"http": gw.url}, timeout=10).json()
    assert doc["protect"]["holds"][0]["host"] == "localhost"
    assert doc["protect"]["rules"][0]["members"][MEMBER]["refused"]["hold"] == 2
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
    req = urllib.request.Request(gw.admin + "/-/reload", method="POST", data=b"")
    with _opener.open(req, timeout=10) as resp:
        assert json.loads(resp.read())["reloaded"] is True


def test_a_reload_changes_the_limits_and_keeps_counting_open_tunnels(start_gateway, echo_server):
    """A tunnel admitted under the old config still holds its place under the new limits (the
    count lives in the gateway, not the config), and frees it when it ends, even after the
    rule is gone."""
    dest = f"127.0.0.1:{echo_server.port}"
    cfg = _config([{"name": "p", "destinations": ["127.0.0.1"], "max_concurrent": 1}], [echo_server.port])
    gw = start_gateway(cfg)
    old = _tunnel(JOB_A, gw, dest)
    connect = f"CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n".encode()
    assert _status(_exchange(JOB_B, gw, connect)) == 429
    cfg["egress"]["shared"]["protect"][0]["max_concurrent"] = 2
    _reload(gw, cfg)
    new = _tunnel(JOB_B, gw, dest)  # the second of two places
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
    tunnel = _tunnel(JOB_A, gw, dest)
    gw.wait_event("egress_source_down")
    members = _admin(gw, "/status")["profiles"]["shared"]["protect"]["rules"][0]["members"]
    assert (members["10.99.99.99"]["in_flight"], members[MEMBER]["in_flight"]) == (0, 1)
    refused = _exchange(JOB_B, gw, f"CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n".encode())
    assert _status(refused) == 429 and f"egress {MEMBER})" in _header(refused, "Proxy-Status")
    tunnel.close()
