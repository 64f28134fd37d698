"""The log and the status answer the questions people ask (issue 15):

- which public IP did a job use? every record carries ``egress_ip``, the attested IP of the
  egress member the request actually used (null when unknown);
- why was a job refused? a 407 record names the user that was tried, and the answer does not
  tell an unknown user from a wrong password; denials are counted per configured client;
  connections refused at the source gate are summarised per source in ``/status``, and logged
  at most once per source per period;
- what is open right now? ``/status`` lists open connections and tunnels (client, profile,
  egress address, target, age, bytes each way), oldest first;
- Squid's format: a denied CONNECT is ``TCP_DENIED/403``; profile and egress IP end the line.

Everything on loopback: the gateway, an origin that echoes the caller's IP (the egress check),
an echo server for tunnels.
"""

from __future__ import annotations

import json
import socket
import urllib.request

from .peers import base_config, basic_auth, open_tunnel, raw_exchange, wait_for

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _status(gw) -> dict:
    return json.loads(_opener.open(gw.admin + "/status", timeout=5).read())


def _metric(gw, name: str) -> float:
    for line in _opener.open(gw.admin + "/metrics", timeout=5).read().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.rpartition(" ")[2])
    return 0.0


def _echo(s: socket.socket, payload: bytes) -> None:
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        got += s.recv(65536)
    assert got == payload


def test_records_carry_the_attested_ip_of_the_member_used(start_gateway, origin, echo):
    # two members, each attested from its own address: a record must name the IP of the one
    # it left through, not the profile's first
    cfg = base_config(
        egress={"x": {"bind": ["127.0.0.3", "127.0.0.4"], "expect_ip": ["127.0.0.3", "127.0.0.4"],
                      "pick": "round_robin"}},
        listen=[{"address": "127.0.0.1:0", "egress": "x"}],
        clients=[{"name": "local", "from": ["127.0.0.0/8"], "egress": ["x"]}],
        probe={"echo_url": origin.url("/ip")},
        security={"connect_ports": [echo.port]})
    gw = start_gateway(cfg)
    wait_for(lambda: _status(gw)["profiles"]["x"]["serving"], "profile x to be verified")
    seen: dict[str, dict] = {}  # the address a request left from (as the origin saw it) -> its record

    def both_members_used() -> bool:
        n = len(gw.log)
        resp = raw_exchange(gw.address, f"GET {origin.url('/ip')} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
        assert resp.startswith(b"HTTP/1.1 200"), resp[:200]
        wait_for(lambda: len(gw.log) > n, "the request's record")
        seen[resp.rpartition(b"\r\n\r\n")[2].decode()] = gw.log[n]
        return len(seen) == 2  # (until the second member's check is in, only the first carries traffic)

    wait_for(both_members_used, "requests through both members of profile x")
    for left_from, rec in seen.items():
        assert rec["egress_addr"] == rec["egress_ip"] == left_from, rec
    tunnel = open_tunnel(gw, f"127.0.0.1:{echo.port}", headers={}, timeout=5)
    _echo(tunnel, b"ping")
    tunnel.close()
    rec = gw.wait_log(lambda r: r["method"] == "CONNECT")
    assert rec["egress_ip"] in ("127.0.0.3", "127.0.0.4") and rec["egress_ip"] == rec["egress_addr"], rec


def test_refused_jobs_leave_a_trail_but_learn_nothing(start_gateway, origin):
    cfg = base_config(
        clients=[{"name": "job-x", "from": ["127.0.0.0/8"], "username": "job-x", "password_env": "JOBX",
                  "allow": ["allowed.example"]}])
    gw = start_gateway(cfg, env={"JOBX": "right-secret"})
    unknown_before = _metric(gw, 'egressgate_denied_by_client_total{client="-",reason="unknown_user"}')
    denied_before = _metric(gw, 'egressgate_denied_by_client_total{client="job-x",reason="destination_not_allowed"}')

    def get(user: str, password: str) -> bytes:
        return raw_exchange(gw.address, f"GET {origin.url('/a')} HTTP/1.1\r\n"
                            f"Proxy-Authorization: {basic_auth(user, password)}\r\nConnection: close\r\n\r\n".encode())

    wrong_password, unknown_user = get("job-x", "wrong-secret"), get("stranger", "wrong-secret")
    assert wrong_password.startswith(b"HTTP/1.1 407") and unknown_user.startswith(b"HTTP/1.1 407")
    assert wrong_password == unknown_user  # head (Proxy-Status details included) and body
    assert get("job-x", "right-secret").startswith(b"HTTP/1.1 403")  # not in job-x's allow list
    ok = raw_exchange(gw.address, b"GET http://egressgate.whoami/ HTTP/1.1\r\n"
                      b"Proxy-Authorization: " + basic_auth("job-x", "right-secret").encode() + b"\r\n\r\n",
                      read_until_close=False)
    assert ok.startswith(b"HTTP/1.1 200")
    wait_for(lambda: len(gw.log) >= 4, "four access records")
    refused = [r for r in gw.log if r["status"] == 407]
    assert [(r["user"], r["reason"], r["client"]) for r in refused] == [
        ("job-x", "bad_credentials", "-"), ("stranger", "unknown_user", "-")], refused
    others = [r for r in gw.log if r["status"] != 407]
    assert others and all("user" not in r for r in others), others  # only a refused login names its user
    assert all(r["egress_ip"] is None for r in gw.log)  # no egress check configured: unknown
    assert not any("secret" in line for line in gw.stdout_lines())  # never a password
    assert _metric(gw, 'egressgate_denied_by_client_total{client="-",reason="unknown_user"}') - unknown_before == 1
    assert _metric(gw, 'egressgate_denied_by_client_total{client="job-x",reason="destination_not_allowed"}') \
        - denied_before == 1


def test_status_lists_open_tunnels_with_bytes_and_age(start_gateway, echo):
    gw = start_gateway(base_config(security={"connect_ports": [echo.port]}))
    first = open_tunnel(gw, f"127.0.0.1:{echo.port}", headers={}, timeout=5)
    _echo(first, b"a" * 1000)
    second = open_tunnel(gw, f"127.0.0.1:{echo.port}", headers={}, timeout=5)

    def tunnel_moved(up: int) -> list[dict] | None:
        rows = _status(gw)["connections"]["open"]
        return rows if len(rows) == 2 and rows[0]["bytes_up"] == up and rows[0]["bytes_down"] == up else None

    rows = wait_for(lambda: tunnel_moved(1000), "the first tunnel's 1000 bytes each way in /status")
    oldest, newest = rows  # oldest first
    assert oldest["age_seconds"] >= newest["age_seconds"] >= 0
    for row in rows:
        assert row["state"] == "tunnel" and row["client"] == "local" and row["profile"] == "default"
        assert row["client_addr"] == "127.0.0.1" and row["egress_addr"] == "127.0.0.1"
        assert row["target"] == f"127.0.0.1:{echo.port}"
    assert (newest["bytes_up"], newest["bytes_down"]) == (0, 0)
    _echo(first, b"b" * 500)  # the numbers move while the tunnel is open
    wait_for(lambda: tunnel_moved(1500), "the first tunnel's 1500 bytes each way in /status")
    first.close()
    second.close()
    wait_for(lambda: _status(gw)["connections"]["open"] == [], "no open connection in /status")


def test_refused_sources_are_summarised_and_logged_per_source(start_gateway):
    gw = start_gateway(base_config(clients=[{"name": "local", "from": ["127.0.0.1/32"]}]))

    def knock(source: str) -> None:
        s = socket.socket()
        s.bind((source, 0))
        s.settimeout(5)
        try:
            s.connect((gw.host, gw.port))
            assert s.recv(100) == b""  # closed before a byte is read
        except ConnectionResetError:
            pass
        finally:
            s.close()

    for source in ("127.0.0.5", "127.0.0.5", "127.0.0.5", "127.0.0.6"):
        knock(source)
    summary = wait_for(lambda: (lambda s: s if len(s["recent"]) == 2 and s["recent"][1]["count"] == 3 else None)(
        _status(gw)["refused_sources"]), "both sources in /status")
    assert summary["total"] == 2
    newest, older = summary["recent"]  # most recently refused first
    assert (newest["client_addr"], newest["count"], newest["reason"]) == ("127.0.0.6", 1, "source_not_allowed")
    assert (older["client_addr"], older["count"]) == ("127.0.0.5", 3)
    assert newest["last_seen"] >= older["last_seen"] > 0
    # one line per source (the second source is not hidden behind the first one's line), and
    # the first source's repeats within the period are not logged again
    wait_for(lambda: any(e.get("event") == "connection_rejected" and e.get("client_addr") == "127.0.0.6"
                         for e in gw.events), "the second source's log line")
    lines = [e for e in gw.events if e.get("event") == "connection_rejected"]
    assert [(e["client_addr"], e["count"]) for e in lines] == [("127.0.0.5", 1), ("127.0.0.6", 1)], lines
    # the gate does not touch the allowed source
    assert raw_exchange(gw.address, b"GET http://egressgate.whoami/ HTTP/1.1\r\n\r\n",
                        read_until_close=False).startswith(b"HTTP/1.1 200")


def test_squid_format_denied_connect_and_extra_fields(start_gateway, origin):
    gw = start_gateway(base_config(log={"format": "squid"}, security={"connect_ports": [443]}))
    raw_exchange(gw.address, f"GET {origin.url('/sq')} HTTP/1.1\r\n\r\n".encode(), read_until_close=False)
    denied = raw_exchange(gw.address, f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n\r\n".encode(),
                          read_until_close=False)
    assert denied.startswith(b"HTTP/1.1 403"), denied[:200]
    lines = wait_for(lambda: (lambda ls: ls if len(ls) >= 2 else None)(gw.stdout_lines()), "two squid lines")
    forward, connect = (line.split() for line in lines[:2])
    assert forward[3] == "TCP_MISS/200" and forward[-2:] == ["default", "-"], forward
    assert connect[3] == "TCP_DENIED/403" and connect[5] == "CONNECT", connect
    assert connect[-2:] == ["default", "-"], connect  # profile, egress IP (none: no egress check)
    assert len(forward) == len(connect) == 12
