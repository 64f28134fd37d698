"""Process lifecycle: SIGTERM drains (an in-flight transfer completes, exit 0), SIGHUP and
POST /-/reload apply a new config, a bad config is refused whole; check-config names file,
line and key."""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import sys
import threading
import urllib.request

from .faulty import read_until_close
from .peers import base_config, open_tunnel, pattern_bytes, pattern_sha256, raw_exchange, wait_for


def _admin(gw, path: str, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(gw.admin + path, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _tunnel(gw, port: int) -> socket.socket:
    s = open_tunnel(gw, f"127.0.0.1:{port}", headers={}, timeout=20)
    s.sendall(b"ping")
    assert s.recv(4) == b"ping"
    return s


def _refused(gw) -> bool:
    """One connection attempt to the proxy listener: True when it is refused."""
    try:
        socket.create_connection((gw.host, gw.port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_drains_inflight_transfer(start_gateway, echo):
    gw = start_gateway(base_config(security={"connect_ports": [echo.port]}, drain={"timeout": 20}))
    s = _tunnel(gw, echo.port)  # in flight when SIGTERM comes
    n = len(gw.events)
    gw.signal(signal.SIGTERM)
    gw.wait_event("drain_started")
    # new connections are refused once the listener closes (drain.grace is 0) ...
    wait_for(lambda: _refused(gw), "the proxy listener to refuse new connections")
    assert gw.proc.poll() is None, "the gateway exited with a tunnel still open"
    # ... while the tunnel carries a whole transfer, byte-exact, both ways
    size = 8 * 1024 * 1024
    received = bytearray()

    def reader():
        while chunk := s.recv(1 << 20):
            received.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    for block in pattern_bytes(size):
        s.sendall(block)
    s.shutdown(socket.SHUT_WR)  # the echo server answers our EOF with its own: the tunnel ends
    t.join(30)
    assert not t.is_alive(), "the tunnel did not end after both sides closed"
    s.close()
    assert len(received) == size and hashlib.sha256(received).hexdigest() == pattern_sha256(size)
    assert gw.wait(timeout=30) == 0
    assert [e["closed_unfinished"] for e in gw.events[n:] if e.get("event") == "drain_finished"] == [0]


def test_drain_timeout_closes_what_is_unfinished(start_gateway, echo):
    gw = start_gateway(base_config(security={"connect_ports": [echo.port]}, drain={"timeout": "500ms"}))
    s = _tunnel(gw, echo.port)  # never finishes by itself
    gw.signal(signal.SIGTERM)
    data, how = read_until_close(s, 15)  # drain.timeout passes: the gateway closes it
    s.close()
    assert data == b"" and how in ("eof", "reset"), (data, how)
    assert gw.wait(timeout=30) == 0
    assert [e["closed_unfinished"] for e in gw.events if e.get("event") == "drain_finished"] == [1]


def test_drain_timeout_still_logs_what_it_closed(start_gateway, echo):
    gw = start_gateway(base_config(security={"connect_ports": [echo.port]}, drain={"timeout": "500ms"}))
    s = _tunnel(gw, echo.port)
    gw.signal(signal.SIGTERM)
    read_until_close(s, 15)
    s.close()
    assert gw.wait(timeout=30) == 0
    rec = gw.wait_log(lambda r: r["method"] == "CONNECT", timeout=5)
    assert rec["status"] == 200 and rec["bytes_up"] == rec["bytes_down"] == 4, rec


def test_readyz_turns_503_during_drain(start_gateway, echo):
    gw = start_gateway(base_config(security={"connect_ports": [echo.port]}, drain={"grace": "5s", "timeout": 5}))
    assert _admin(gw, "/readyz")[0] == 200
    gw.signal(signal.SIGTERM)
    gw.wait_event("drain_started")
    status, body = _admin(gw, "/readyz")
    assert status == 503 and b"draining" in body
    # during the grace period the listener still accepts (5 s: far more than these two requests take)
    resp = raw_exchange(gw.address, b"GET http://egressgate.whoami/ HTTP/1.1\r\n\r\n", read_until_close=False)
    assert resp.startswith(b"HTTP/1.1 200")
    assert gw.wait(timeout=30) == 0


def test_reload_by_sighup_and_admin(start_gateway, origin):
    gw = start_gateway(base_config())
    assert raw_exchange(gw.address, f"GET {origin.url('/r')} HTTP/1.1\r\n\r\n".encode(),
                        read_until_close=False).startswith(b"HTTP/1.1 200")
    # new config: this client may only reach *.example.com -> the origin is refused
    cfg = base_config(clients=[{"name": "local", "from": ["127.0.0.0/8"], "allow": ["*.example.com"]}])
    cfg["listen"] = [{"address": gw.address}]
    cfg["admin"] = {"address": gw.admin.removeprefix("http://")}
    gw.write_config(cfg)
    n_events = len(gw.events)
    gw.signal(signal.SIGHUP)
    gw.wait_event("reloaded", after=n_events)
    resp = raw_exchange(gw.address, f"GET {origin.url('/r')} HTTP/1.1\r\n\r\n".encode(), read_until_close=False)
    assert resp.startswith(b"HTTP/1.1 403")
    # a broken config is refused whole; the old one stays in force
    gw.write_config("clients:\n  - name: x\n    frm: [10.0.0.0/8]\n")
    status, body = _admin(gw, "/-/reload", "POST")
    assert status == 400 and b"clients[0].frm: unknown key" in body and b":3:" in body
    resp = raw_exchange(gw.address, f"GET {origin.url('/r')} HTTP/1.1\r\n\r\n".encode(), read_until_close=False)
    assert resp.startswith(b"HTTP/1.1 403")
    _, metrics = _admin(gw, "/metrics")
    assert b'egressgate_config_reloads_total{result="success"} 1.0' in metrics
    assert b'egressgate_config_reloads_total{result="failure"} 1.0' in metrics


def test_check_config_reports_file_line_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen:\n  - address: 0.0.0.0:3128\n    egress: nowhere\nclients:\n  - name: a\n"
                   "    from: [10.0.0.0/8, not-a-cidr]\n")
    r = subprocess.run([sys.executable, "-m", "egressgate", "check-config", str(bad)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1
    assert f"{bad}:6: clients[0].from[1]: not an IP address or CIDR: 'not-a-cidr'" in r.stderr
    good = tmp_path / "good.yaml"
    good.write_text("")
    r = subprocess.run([sys.executable, "-m", "egressgate", "check-config", str(good)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_admin_endpoints(start_gateway):
    gw = start_gateway(base_config())
    assert _admin(gw, "/healthz") == (200, b"ok\n")
    status, body = _admin(gw, "/status")
    import json

    doc = json.loads(body)
    assert status == 200 and doc["profiles"]["default"]["kind"] == "direct"
    assert _admin(gw, "/nope")[0] == 404
    assert _admin(gw, "/-/reload")[0] == 405


def test_reload_endpoint_requires_the_bearer_token(start_gateway):
    gw = start_gateway(base_config(admin={"token_env": "EG_ADMIN_TOKEN"}), env={"EG_ADMIN_TOKEN": "t0ken"})
    assert _admin(gw, "/-/reload", "POST")[0] == 401
    req = urllib.request.Request(gw.admin + "/-/reload", method="POST", headers={"Authorization": "Bearer wrong"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        opener.open(req, timeout=5)
        raise AssertionError("a wrong token was accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 401
    req = urllib.request.Request(gw.admin + "/-/reload", method="POST", headers={"Authorization": "Bearer t0ken"})
    with opener.open(req, timeout=5) as r:
        assert r.status == 200
    assert _admin(gw, "/metrics")[0] == 200  # reads stay open


def _reload_with(gw, token: str) -> int:
    req = urllib.request.Request(gw.admin + "/-/reload", method="POST", headers={"Authorization": f"Bearer {token}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_reload_token_from_a_file_is_read_again_on_reload(start_gateway, tmp_path):
    """admin.token_file (a mounted Secret): the token is the file's content, and a reload takes
    a rotated one; a token file that was emptied fails the reload instead of opening the admin
    listener."""
    secret = tmp_path / "admin-token"
    secret.write_text("first-t0ken\n")
    gw = start_gateway(base_config(admin={"token_file": str(secret)}))
    assert _admin(gw, "/-/reload", "POST")[0] == 401
    secret.write_text("second-t0ken\n")  # rotated; in force from the next reload on
    assert _reload_with(gw, "first-t0ken") == 200
    assert _reload_with(gw, "first-t0ken") == 401
    assert _reload_with(gw, "second-t0ken") == 200
    secret.write_text("")
    assert _reload_with(gw, "second-t0ken") == 400  # refused: the old token stays in force
    assert _reload_with(gw, "") == 401
