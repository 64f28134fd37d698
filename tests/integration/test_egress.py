"""Egress profiles: the origin sees the profile's source address; profile selection by
username suffix and header; pools skip unbindable addresses; chained upstream proxies
(a second gateway and tinyproxy) with failover; moving a profile by reload while a tunnel on
the old address keeps flowing; probe reports a mismatch."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from .. import required
from .conftest import curl, need
from .peers import (
    ClosedPort,
    base_config,
    basic_auth,
    open_tunnel,
    pattern_bytes,
    pattern_sha256,
    raw_exchange,
)

SECRET = "s3cret"


def _hash(password: str) -> str:
    r = subprocess.run([sys.executable, "-m", "egressgate", "hash-password", "--allow-short"], input=password, capture_output=True,
                       text=True, timeout=30, check=True)
    return r.stdout.strip()


@pytest.fixture(scope="module")
def password_hash() -> str:
    return _hash(SECRET)


def two_profile_config(password_hash: str, *ports: int, b_source: str = "127.0.0.3") -> dict:
    return base_config(
        egress={"ip-a": {"bind": ["127.0.0.2"]}, "ip-b": {"bind": [b_source]}},
        clients=[
            {"name": "job-a", "from": ["127.0.0.0/8"], "username": "job-a", "password_hash": password_hash,
             "egress": ["ip-a"]},
            {"name": "job-ab", "from": ["127.0.0.0/8"], "username": "job-ab", "password_hash": password_hash,
             "egress": ["ip-a", "ip-b"]},
        ],
        security={"connect_ports": [443, *ports]},
    )


def test_profiles_seen_by_origin(start_gateway, origin, password_hash):
    gw = start_gateway(two_profile_config(password_hash, origin.port))
    a = f"http://job-a:{SECRET}@{gw.address}"
    ab_b = f"http://job-ab+ip-b:{SECRET}@{gw.address}"
    # plain HTTP (curl) and CONNECT (curl -p), each profile
    assert curl("-x", a, origin.url("/ip")).stdout == b"127.0.0.2"
    assert curl("-p", "-x", a, origin.url("/ip")).stdout == b"127.0.0.2"
    assert curl("-x", ab_b, origin.url("/ip")).stdout == b"127.0.0.3"
    assert curl("-p", "-x", ab_b, origin.url("/ip")).stdout == b"127.0.0.3"
    # requests, profile picked by header; default is the first profile
    with requests.Session() as s:
        s.trust_env = False
        ab = f"http://job-ab:{SECRET}@{gw.address}"
        assert s.get(origin.url("/ip"), proxies={"http": ab}, timeout=10).text == "127.0.0.2"
        r = s.get(origin.url("/ip"), proxies={"http": ab}, headers={"X-Egressgate-Profile": "ip-b"}, timeout=10)
        assert r.text == "127.0.0.3"
    rec = gw.wait_log(lambda r: r["client"] == "job-ab" and r["profile"] == "ip-b")
    assert rec["egress_addr"] == "127.0.0.3"


def test_whoami_answers_for_the_profile_the_request_picks(start_gateway, origin, password_hash):
    """A job that picks its profile with X-Egressgate-Profile gets whoami about that profile,
    as its requests would leave (it used to get its default profile's)."""
    gw = start_gateway(two_profile_config(password_hash, origin.port))
    with requests.Session() as s:
        s.trust_env = False
        ab = {"http": f"http://job-ab:{SECRET}@{gw.address}"}
        assert s.get("http://egressgate.whoami/", proxies=ab, timeout=10).json()["profile"] == "ip-a"
        doc = s.get("http://egressgate.whoami/", proxies=ab, headers={"X-Egressgate-Profile": "ip-b"},
                    timeout=10).json()
        assert doc["profile"] == "ip-b" and doc["egress"] == {"kind": "bind", "sources": ["127.0.0.3"],
                                                                 "standby": [], "carrying": ["127.0.0.3"]}
        by_user = {"http": f"http://job-ab+ip-b:{SECRET}@{gw.address}"}
        assert s.get("http://egressgate.whoami/", proxies=by_user, timeout=10).json()["profile"] == "ip-b"


def test_allowlisting_origin(start_gateway, origin, password_hash):
    gw = start_gateway(two_profile_config(password_hash, origin.port))
    url = origin.url("/only-from?addr=127.0.0.2")
    assert curl("-x", f"http://job-ab+ip-a:{SECRET}@{gw.address}", url).stdout == b"welcome\n"
    assert b"not allowlisted" in curl("-x", f"http://job-ab+ip-b:{SECRET}@{gw.address}", url).stdout


def test_profile_not_allowed_and_auth(start_gateway, origin, password_hash):
    gw = start_gateway(two_profile_config(password_hash, origin.port))
    r = curl("-i", "-x", f"http://job-a+ip-b:{SECRET}@{gw.address}", origin.url("/ip"))
    assert b" 403 " in r.stdout.split(b"\r\n")[0] and b"profile_not_allowed" in r.stdout
    r = curl("-i", "-x", f"http://job-a:wrong@{gw.address}", origin.url("/ip"))
    assert b" 407 " in r.stdout.split(b"\r\n")[0] and b'Proxy-Authenticate: Basic realm="egressgate"' in r.stdout
    r = curl("-i", "-x", gw.url, origin.url("/ip"))
    assert b" 407 " in r.stdout.split(b"\r\n")[0]


def test_pool_skips_unbindable_address(start_gateway, origin):
    cfg = base_config(egress={"pool": {"bind": ["10.99.99.99", "127.0.0.4"], "pick": "round_robin"}},
                      clients=[{"name": "local", "from": ["127.0.0.0/8"], "egress": ["pool"]}])
    gw = start_gateway(cfg)
    seen = {curl("-x", gw.url, origin.url("/ip")).stdout for _ in range(4)}
    assert seen == {b"127.0.0.4"}
    gw.wait_event("egress_source_down")
    metrics = urlopen(gw.admin + "/metrics")
    assert b'egressgate_egress_source_up{member="10.99.99.99",profile="pool"} 0.0' in metrics


def test_round_robin_advances_once_per_request(start_gateway, origin):
    """A keep-alive client's requests take the pool's members in turn. Each request asks the
    pool once: the gateway used to ask twice when a known client's request found no idle
    upstream connection (the fast path, then the full path), so a two-member round-robin
    pool sent every request after the first from the same address."""
    cfg = base_config(egress={"pool": {"bind": ["127.0.0.2", "127.0.0.3"], "pick": "round_robin"}},
                      clients=[{"name": "local", "from": ["127.0.0.0/8"], "egress": ["pool"]}])
    gw = start_gateway(cfg)
    with requests.Session() as s:
        s.trust_env = False
        seen = [s.get(origin.url("/ip"), proxies={"http": gw.url}, timeout=10).text for _ in range(6)]
    assert seen == ["127.0.0.2", "127.0.0.3"] * 3, seen


def urlopen(url: str) -> bytes:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as r:
        return r.read()


def _status(gw) -> dict:
    return json.loads(urlopen(gw.admin + "/status"))


def test_chain_through_second_gateway_with_failover(start_gateway, origin, password_hash):
    # the far gateway egresses from 127.0.0.5 and wants credentials
    far = start_gateway(base_config(
        egress={"far": {"bind": ["127.0.0.5"]}},
        clients=[{"name": "near", "from": ["127.0.0.0/8"], "username": "near", "password_hash": password_hash,
                  "egress": ["far"]}],
        security={"connect_ports": [origin.port]}))
    with ClosedPort() as dead:  # the first upstream refuses connections (and nobody takes its port)
        near = start_gateway(base_config(
            egress={"chained": {"upstream": [f"http://{dead.address}", f"http://near:{SECRET}@{far.address}"]}},
            clients=[{"name": "local", "from": ["127.0.0.0/8"], "egress": ["chained"]}],
            security={"connect_ports": [origin.port], "allow_private": ["127.0.0.0/8"]}))
        members = _status(near)["profiles"]["chained"]["members"]
        assert dead.address in members[0] and far.address in members[1], members
        assert _status(near)["profiles"]["chained"]["down"] == []
        assert curl("-x", near.url, origin.url("/ip")).stdout == b"127.0.0.5"
        # the dead upstream was tried first: it is marked down, the live one is not
        assert _status(near)["profiles"]["chained"]["down"] == [members[0]]
        metrics = urlopen(near.admin + "/metrics").decode()
        assert f'egressgate_egress_source_up{{member="{members[0]}",profile="chained"}} 0.0' in metrics
        assert f'egressgate_egress_source_up{{member="{members[1]}",profile="chained"}} 1.0' in metrics
        assert curl("-p", "-x", near.url, origin.url("/ip")).stdout == b"127.0.0.5"
    rec = far.wait_log(lambda r: r["client"] == "near" and r["method"] == "CONNECT")
    assert rec["egress_addr"] == "127.0.0.5"


def test_upstreams_are_tried_in_failover_order_for_every_client(start_gateway, origin):
    far = start_gateway(base_config(security={"connect_ports": [origin.port]}))
    with ClosedPort() as dead:
        near = start_gateway(base_config(
            egress={"chained": {"upstream": [f"http://{dead.address}", f"http://{far.address}"]}},
            clients=[{"name": "job-a", "from": ["127.0.0.0/8"], "egress": ["chained"]}],  # crc32 % 2 == 1
            security={"connect_ports": [origin.port]}))
        assert curl("-x", near.url, origin.url("/ip")).returncode == 0
        members = _status(near)["profiles"]["chained"]["members"]
        assert _status(near)["profiles"]["chained"]["down"] == [members[0]], "the first upstream was not tried"


def _start_tinyproxy(exe: str, tmp_path, attempts: int = 5):
    """tinyproxy on a free port: it binds the port itself, so a clash with anything that took
    the number meanwhile is retried with another one; it is ready when it answers as tinyproxy."""
    problems = []
    for attempt in range(attempts):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        conf = tmp_path / f"tinyproxy-{attempt}.conf"
        conf.write_text(f"Port {port}\nListen 127.0.0.1\nBind 127.0.0.6\nTimeout 30\nMaxClients 20\n"
                        f"Allow 127.0.0.0/8\nLogLevel Critical\nPidFile \"{tmp_path}/tp-{attempt}.pid\"\n")
        proc = subprocess.Popen([exe, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    if b"Server: tinyproxy" in s.recv(4096):
                        return proc, port
            except OSError:
                time.sleep(0.05)  # polling a process that is still starting
        proc.kill()
        proc.wait(5)
        problems.append(f"port {port}: exit {proc.returncode}: {proc.stderr.read().decode(errors='replace')[-300:]}")
    raise RuntimeError("tinyproxy did not start:\n" + "\n".join(problems))


@pytest.fixture
def tinyproxy(tmp_path):
    proc, port = _start_tinyproxy(need("tinyproxy"), tmp_path)
    yield port
    proc.terminate()
    proc.wait(5)


def test_chain_through_tinyproxy(start_gateway, origin, tinyproxy):
    # No allow_private: the configured upstream on loopback is reachable all the same (the
    # guard is for destinations clients ask for), and the name is resolved by tinyproxy
    # (localhost is sent on only because allow_suffixes names it: see test_chained_names.py).
    gw = start_gateway(base_config(
        egress={"tp": {"upstream": [f"http://127.0.0.1:{tinyproxy}"]}},
        clients=[{"name": "local", "from": ["127.0.0.0/8"], "egress": ["tp"]}],
        security={"connect_ports": [origin.port], "allow_private": [], "allow_suffixes": ["localhost"]}))
    # tinyproxy binds its outgoing connections to 127.0.0.6
    assert curl("-x", gw.url, origin.url("/ip", host="localhost")).stdout == b"127.0.0.6"
    assert curl("-p", "-x", gw.url, origin.url("/ip", host="localhost")).stdout == b"127.0.0.6"
    # an IP-literal destination is still judged by the guard
    r = curl("-i", "-x", gw.url, origin.url("/ip"))
    assert b" 403 " in r.stdout.split(b"\r\n")[0] and b"destination_ip_prohibited" in r.stdout


def test_ipv6_source_and_destination(start_gateway):
    lsock = required.ipv6_loopback()
    port = lsock.getsockname()[1]
    gw = start_gateway(base_config(egress={"v6": {"bind": ["::1"]}},
                                   clients=[{"name": "local", "from": ["127.0.0.0/8"], "egress": ["v6"]}],
                                   security={"connect_ports": [port]}))
    s = socket.create_connection((gw.host, gw.port), timeout=5)
    s.sendall(f"CONNECT [::1]:{port} HTTP/1.1\r\n\r\n".encode())
    assert s.recv(100).startswith(b"HTTP/1.1 200")
    conn, addr = lsock.accept()
    assert addr[0] == "::1"
    conn.close()
    s.close()
    lsock.close()
    # an IPv6 source cannot reach an IPv4 destination: a clear 502, not a hang
    r = raw_exchange(gw.address, b"GET http://127.0.0.1:9/ HTTP/1.1\r\n\r\n", read_until_close=False)
    assert r.startswith(b"HTTP/1.1 502") and b"address family" in r


def test_demo_runs():
    r = subprocess.run([sys.executable, "-m", "egressgate", "demo"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    before = next(i for i, ln in enumerate(lines) if ln.startswith("1)"))
    after = next(i for i, ln in enumerate(lines) if ln.startswith("2)"))
    first = {ln.split()[0]: ln for ln in lines[before + 2:before + 4]}
    second = {ln.split()[0]: ln for ln in lines[after + 2:after + 4]}
    assert "127.0.0.3" in first["job-b"] and "403" in first["job-b"]
    assert "127.0.0.2" in second["job-b"] and "200" in second["job-b"]
    assert "ip-b: expected 127.0.0.2, observed 127.0.0.2, OK" in r.stdout


def test_reload_moves_profile_while_old_tunnel_flows(start_gateway, echo, origin, password_hash):
    cfg = two_profile_config(password_hash, origin.port, echo.port)
    gw = start_gateway(cfg)
    s = open_tunnel(gw, f"127.0.0.1:{echo.port}", headers={"Proxy-Authorization": basic_auth("job-ab+ip-b", SECRET)},
                    timeout=30)

    def roundtrip(n: int) -> None:
        """n bytes through the tunnel and back, byte-exact (a reader thread: the echo server
        answers while we send)."""
        got = bytearray()

        def reader():
            while len(got) < n and (chunk := s.recv(1 << 20)):
                got.extend(chunk)

        t = threading.Thread(target=reader)
        t.start()
        for block in pattern_bytes(n):
            s.sendall(block)
        t.join(30)
        assert len(got) == n and hashlib.sha256(got).hexdigest() == pattern_sha256(n)

    roundtrip(4 * 1024 * 1024)  # the tunnel is flowing, from the old address
    old_peers = len(echo.peers)
    cfg["egress"]["ip-b"] = {"bind": ["127.0.0.7"]}
    cfg["listen"] = [{"address": gw.address}]
    cfg["admin"] = {"address": gw.admin.removeprefix("http://")}
    gw.write_config(cfg)
    status = json.loads(_post(gw.admin + "/-/reload"))
    assert status["reloaded"] is True
    # new connections leave from the new address at once
    assert curl("-x", f"http://job-ab+ip-b:{SECRET}@{gw.address}", origin.url("/ip")).stdout == b"127.0.0.7"
    # the open tunnel keeps flowing, still from the old address
    roundtrip(4 * 1024 * 1024)
    s.shutdown(socket.SHUT_WR)
    assert s.recv(100) == b""
    s.close()
    assert echo.peers[old_peers - 1] == "127.0.0.3" and len(echo.peers) == old_peers
    rec = gw.wait_log(lambda r: r["method"] == "CONNECT" and r["profile"] == "ip-b")
    assert rec["egress_addr"] == "127.0.0.3" and rec["bytes_up"] == rec["bytes_down"] == 8 * 1024 * 1024


def _post(url: str) -> bytes:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(url, method="POST"), timeout=10) as r:
        return r.read()


def test_probe_reports_mismatch(tmp_path, origin):
    import yaml

    cfg = {"egress": {"good": {"bind": ["127.0.0.2"], "expect_ip": ["127.0.0.2"]},
                      "bad": {"bind": ["127.0.0.3"], "expect_ip": ["203.0.113.9"]}},
           "probe": {"echo_url": "http://127.0.0.1:9/unused"}}  # --echo-url below wins
    path = tmp_path / "probe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "egressgate", "probe", "--config", str(path), "--echo-url", origin.url("/ip")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    assert "127.0.0.2" in lines["good"] and lines["good"].rstrip().endswith("OK")
    assert "127.0.0.3" in lines["bad"] and "MISMATCH" in lines["bad"]
    r = subprocess.run([*cmd, "--profile", "good"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_probe_echo_url_stands_in_for_a_missing_probe_echo_url(tmp_path, origin):
    """Defect (issue 29 item 8): a config with expect_ip and no probe.echo_url was refused by
    `probe --echo-url`, though the flag supplies exactly what is missing."""
    import yaml

    path = tmp_path / "probe.yaml"
    path.write_text(yaml.safe_dump({"egress": {"good": {"bind": ["127.0.0.2"], "expect_ip": ["127.0.0.2"]}}}))
    cmd = [sys.executable, "-m", "egressgate", "probe", "--config", str(path)]
    r = subprocess.run([*cmd, "--echo-url", origin.url("/ip")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "127.0.0.2" in r.stdout and r.stdout.rstrip().endswith("OK")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)  # without the flag: still refused
    assert r.returncode == 1 and "probe.echo_url" in r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("password, extra, ok", [("short", [], False), ("elevenchars", [], False),
                                                 ("short", ["--allow-short"], True),
                                                 ("twelve-chars", [], True)])
def test_hash_password_refuses_short_passwords(password, extra, ok):
    """Defect (issue 29 item 11): hash-password accepted a one-character password."""
    r = subprocess.run([sys.executable, "-m", "egressgate", "hash-password", *extra], input=password,
                       capture_output=True, text=True, timeout=60)
    if ok:
        assert r.returncode == 0 and r.stdout.startswith("scrypt$"), r.stderr
    else:
        assert r.returncode == 2 and not r.stdout and "at least 12" in r.stderr and "--allow-short" in r.stderr


def test_readyz_fails_on_egress_mismatch(start_gateway, origin):
    gw = start_gateway(base_config(egress={"x": {"bind": ["127.0.0.3"], "expect_ip": ["203.0.113.9"]}},
                                   probe={"echo_url": origin.url("/ip")}))
    deadline = time.monotonic() + 10
    import urllib.error

    while time.monotonic() < deadline:
        try:
            urlopen(gw.admin + "/readyz")
        except urllib.error.HTTPError as e:
            assert e.code == 503 and b"203.0.113.9" in e.read()
            break
        time.sleep(0.1)
    else:
        pytest.fail("/readyz never reported the mismatch")
    assert b'egressgate_egress_ip_match{profile="x"} 0.0' in urlopen(gw.admin + "/metrics")
    resp = raw_exchange(gw.address, b"GET http://egressgate.whoami/ HTTP/1.1\r\nX-Egressgate-Profile: x\r\n\r\n",
                        read_until_close=False)
    assert resp.startswith(b"HTTP/1.1 200")
