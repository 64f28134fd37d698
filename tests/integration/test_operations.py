"""Operations: metrics move by exactly the traffic sent; access-log lines are complete JSON
for forwards, tunnels and denials; SIGUSR1 reopens the log file after rotation without
losing a line; Squid's log format."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import urllib.request

from .peers import base_config, raw_exchange, request_tunnel, wait_for

FIELDS = {"ts", "client_addr", "client", "listener", "method", "target", "status", "profile", "egress_addr", "egress_ip",
          "upstream_addr", "bytes_up", "bytes_down", "duration_ms", "reason"}  # the README's list


def _scrape(gw) -> dict[str, float]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(gw.admin + "/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _delta(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def _tunnel(gw, port: int, payload: bytes) -> bytes:
    with request_tunnel(gw, f"127.0.0.1:{port}", headers={}, timeout=5)[0] as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


def test_metrics_move_by_exactly_the_traffic(start_gateway, origin, echo):
    gw = start_gateway(base_config(security={"connect_ports": [echo.port]}))
    before = _scrape(gw)
    for _ in range(3):  # three new client connections: no upstream connection to reuse
        resp = raw_exchange(gw.address, f"GET {origin.url('/bytes?n=1000')} HTTP/1.1\r\nConnection: close\r\n\r\n"
                            .encode())
        assert resp.startswith(b"HTTP/1.1 200")
    raw_exchange(gw.address, b"GET http://10.0.0.1/ HTTP/1.1\r\n\r\n", read_until_close=False)
    assert _tunnel(gw, echo.port, b"x" * 5000) == b"x" * 5000
    # one name lookup that misses the cache ("localhost" resolves without a name server)
    resp = raw_exchange(gw.address, f"GET {origin.url('/n', host='localhost')} HTTP/1.1\r\nConnection: close\r\n\r\n"
                        .encode())
    assert resp.startswith(b"HTTP/1.1 200"), resp[:200]
    gw.wait_log(lambda r: r["method"] == "CONNECT")
    after = _scrape(gw)
    labels = 'client="local",method="GET",profile="default",status="200"'
    assert _delta(before, after, f"egressgate_requests_total{{{labels}}}") == 4
    assert _delta(before, after, 'egressgate_requests_total{client="local",method="GET",profile="default",'
                                 'status="403"}') == 1
    assert _delta(before, after, 'egressgate_requests_total{client="local",method="CONNECT",profile="default",'
                                 'status="200"}') == 1
    assert _delta(before, after, 'egressgate_denied_total{reason="destination_ip_prohibited"}') == 1
    assert _delta(before, after, 'egressgate_bytes_total{direction="down",profile="default"}') == 3000 + 5000 + len(b"hello /n\n")
    # the latency histograms move: one connect observation per dial -- the first GET and the
    # tunnel; the other GETs (by name too: the same address) reuse the first one's idle origin
    # connection, the refused request dials nothing -- and one DNS observation per lookup that
    # missed the cache; each observation lands in a bucket
    assert _delta(before, after, 'egressgate_connect_seconds_count{profile="default"}') == 2
    assert _delta(before, after, 'egressgate_connect_seconds_bucket{le="+Inf",profile="default"}') == 2
    assert _delta(before, after, 'egressgate_connect_seconds_sum{profile="default"}') > 0
    assert _delta(before, after, "egressgate_dns_seconds_count") == 1
    assert _delta(before, after, 'egressgate_dns_seconds_bucket{le="+Inf"}') == 1
    assert _delta(before, after, 'egressgate_bytes_total{direction="up",profile="default"}') == 5000
    assert after['egressgate_active_tunnels{listener="127.0.0.1:0"}'] == 0
    assert after["egressgate_ready"] == 1


def test_access_log_lines_complete_for_every_kind(start_gateway, origin, echo, tmp_path):
    log = tmp_path / "access.log"
    gw = start_gateway(base_config(security={"connect_ports": [echo.port]}, log={"access": str(log)}))
    raw_exchange(gw.address, f"GET {origin.url('/a')} HTTP/1.1\r\n\r\n".encode(), read_until_close=False)
    _tunnel(gw, echo.port, b"hello")
    raw_exchange(gw.address, b"GET http://169.254.169.254/ HTTP/1.1\r\n\r\n", read_until_close=False)
    wait_for(lambda: log.exists() and log.read_text().count("\n") >= 3, "three lines in the access log file")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 3
    for rec in records:
        assert set(rec) >= FIELDS, FIELDS - set(rec)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["ts"])
        assert rec["listener"] == "127.0.0.1:0"  # the configured listener address
    forward, tunnel, denial = records
    assert forward["method"] == "GET" and forward["status"] == 200 and forward["upstream_addr"] == "127.0.0.1"
    assert tunnel["method"] == "CONNECT" and tunnel["bytes_up"] == 5 and tunnel["bytes_down"] == 5
    assert denial["status"] == 403 and denial["reason"] == "destination_ip_prohibited"


def test_logrotate_reopen_loses_no_line(start_gateway, origin, tmp_path):
    log = tmp_path / "access.log"
    gw = start_gateway(base_config(log={"access": str(log)}))
    total = 200
    with socket.create_connection((gw.host, gw.port), timeout=10) as s:
        for i in range(total):
            s.sendall(f"GET {origin.url(f'/n{i}')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            buf = b""
            while not buf.endswith(f"hello /n{i}\n".encode()):
                buf += s.recv(65536)
            if i == total // 2:
                os.rename(log, tmp_path / "access.log.1")  # what logrotate does
                gw.signal(signal.SIGUSR1)

    def all_lines() -> list[str]:
        lines = (tmp_path / "access.log.1").read_text().splitlines()
        return lines + (log.read_text().splitlines() if log.exists() else [])

    wait_for(lambda: len(all_lines()) >= total, f"{total} lines in the two log files")
    lines = all_lines()
    targets = sorted(json.loads(line)["target"] for line in lines)
    assert len(lines) == total
    assert targets == sorted(origin.url(f"/n{i}") for i in range(total))
    assert log.exists() and log.read_text()  # the reopened file received the later lines


def test_squid_log_format(start_gateway, origin):
    gw = start_gateway(base_config(log={"format": "squid"}))
    raw_exchange(gw.address, f"GET {origin.url('/sq')} HTTP/1.1\r\n\r\n".encode(), read_until_close=False)
    wait_for(gw.stdout_lines, "a line on stdout")
    line = gw.stdout_lines()[0]
    fields = line.split()
    assert re.fullmatch(r"\d+\.\d{3}", fields[0]) and fields[2] == "127.0.0.1"
    assert fields[3] == "TCP_MISS/200" and fields[5] == "GET" and fields[6] == origin.url("/sq")


def test_status_counts_live_connections_per_client_and_profile(start_gateway, echo):
    gw = start_gateway(base_config(security={"connect_ports": [echo.port]}))
    s = socket.create_connection((gw.host, gw.port), timeout=5)
    s.sendall(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\n\r\n".encode())
    assert s.recv(100).startswith(b"HTTP/1.1 200")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    doc = json.loads(opener.open(gw.admin + "/status", timeout=5).read())
    s.close()
    assert doc["connections"]["tunnels"] == 1
    assert doc["connections"]["by_client"] == {"local": 1}
    assert doc["connections"]["by_profile"] == {"default": 1}
    assert doc["profiles"]["default"]["kind"] == "direct"
