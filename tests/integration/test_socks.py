"""The SOCKS5 listener (``listen[].protocol: socks5``) with real clients: curl
``--socks5-hostname``, ``requests[socks]``, an SFTP download (asyncssh) through it; refusals
mapped onto SOCKS reply codes with the precise reason in the access record; hostile
negotiations answered where the protocol allows, then closed."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import asyncssh
import pytest
import requests
import socks

from .. import required
from .conftest import curl
from .peers import ClosedPort, base_config, pattern_sha256, raw_exchange

SECRET = "s3cret-socks"
ENV = {"JOB_SECRET": SECRET}


def _socks_gw(start_gateway, origin_port: int, clients=None, egress=None, security=None, **extra):
    cfg = base_config(listen=[{"address": "127.0.0.1:0", "protocol": "socks5"}],
                      egress={"default": {"direct": {}}, "ip-b": {"bind": ["127.0.0.2"]}, **(egress or {})},
                      clients=clients if clients is not None else [
                          {"name": "job", "from": ["127.0.0.0/8"], "username": "job", "password_env": "JOB_SECRET",
                           "egress": ["default", "ip-b"]}],
                      security=security or {"connect_ports": [origin_port]}, **extra)
    return start_gateway(cfg, env=ENV)


def _get(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as r:
        return r.read().decode()


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def _read_reply(s: socket.socket) -> tuple[int, bytes]:
    head = _recv_exact(s, 4)
    if len(head) < 4:
        return -1, head
    rest = {1: 4, 4: 16}.get(head[3], 0) + 2
    return head[1], head + _recv_exact(s, rest)


def _socks(gw, dest: bytes, user: bytes | None = b"job", password: bytes = SECRET.encode(),
           cmd: int = 1) -> tuple[socket.socket, int]:
    """Negotiate by hand; ``dest`` is ATYP + DST.ADDR + DST.PORT. Returns the socket and the reply code."""
    s = socket.create_connection((gw.host, gw.port), timeout=20)
    s.sendall(b"\x05\x01\x02" if user is not None else b"\x05\x01\x00")
    method = _recv_exact(s, 2)
    if user is not None:
        assert method == b"\x05\x02", method
        s.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
        auth = _recv_exact(s, 2)
        if auth != b"\x01\x00":
            return s, -2
    else:
        assert method == b"\x05\x00", method
    s.sendall(b"\x05" + bytes([cmd]) + b"\x00" + dest)
    code, _ = _read_reply(s)
    return s, code


def _domain(host: str, port: int) -> bytes:
    return b"\x03" + bytes([len(host)]) + host.encode() + struct.pack(">H", port)


def _ipv4(host: str, port: int) -> bytes:
    return b"\x01" + socket.inet_aton(host) + struct.pack(">H", port)


def _closed(s: socket.socket) -> bool:
    """The gateway closed the connection (EOF or reset) within the socket's timeout."""
    try:
        while s.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        s.close()


# --- real clients ----------------------------------------------------------------------------------

def test_curl_socks5_hostname_with_credentials_and_profile(start_gateway, origin):
    gw = _socks_gw(start_gateway, origin.port)
    proxy = f"socks5h://job+ip-b:{SECRET}@{gw.address}"
    n = 3 * 1024 * 1024 + 17
    r = curl("--socks5-hostname", gw.address, "--proxy-user", f"job+ip-b:{SECRET}",
             origin.url(f"/bytes?n={n}", host="localhost"))
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(r.stdout).hexdigest() == pattern_sha256(n)
    assert curl("-x", proxy, origin.url("/ip", host="localhost")).stdout == b"127.0.0.2"
    assert curl("-x", f"socks5h://job:{SECRET}@{gw.address}", origin.url("/ip", host="localhost")).stdout == \
        b"127.0.0.1"
    rec = gw.wait_log(lambda r: r["method"] == "SOCKS5" and r["bytes_down"] > n)
    assert rec["client"] == "job" and rec["profile"] == "ip-b" and rec["egress_addr"] == "127.0.0.2"
    assert rec["target"] == f"localhost:{origin.port}" and rec["status"] == 200
    metrics = _get(gw.admin + "/metrics")
    assert 'egressgate_socks_replies_total{reply="succeeded"} 3.0' in metrics
    assert 'method="SOCKS5"' in metrics
    assert 'egressgate_listener_info{listener="127.0.0.1:0",protocol="socks5"} 1.0' in metrics


def test_requests_socks5h(start_gateway, origin):
    gw = _socks_gw(start_gateway, origin.port)
    proxies = {"http": f"socks5h://job+ip-b:{SECRET}@{gw.address}"}
    r = requests.get(origin.url("/bytes?n=100000", host="localhost"), proxies=proxies, timeout=20)
    assert hashlib.sha256(r.content).hexdigest() == pattern_sha256(100000)
    assert requests.get(origin.url("/ip", host="localhost"), proxies=proxies, timeout=20).text == "127.0.0.2"


def test_sftp_download_through_the_listener(start_gateway, tmp_path):
    data = bytes(range(256)) * 20000 + b"tail"  # ~5 MB
    (tmp_path / "feed.bin").write_bytes(data)
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    user_key = asyncssh.generate_private_key("ssh-ed25519")
    peers: list[str] = []

    class Server(asyncssh.SSHServer):
        def connection_made(self, conn) -> None:
            peers.append(conn.get_extra_info("peername")[0])

        def begin_auth(self, username: str) -> bool:
            return True

        def public_key_auth_supported(self) -> bool:
            return True

        def validate_public_key(self, username: str, key) -> bool:
            return key.public_data == user_key.public_data

    async def run() -> bytes:
        server = await asyncssh.create_server(Server, "127.0.0.1", 0, server_host_keys=[host_key],
                                              sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=str(tmp_path)))
        port = server.sockets[0].getsockname()[1]
        try:
            gw = _socks_gw(start_gateway, port)
            loop = asyncio.get_running_loop()
            sock = await loop.run_in_executor(None, lambda: socks.create_connection(
                ("localhost", port), proxy_type=socks.SOCKS5, proxy_addr=gw.host, proxy_port=gw.port,
                proxy_rdns=True, proxy_username="job+ip-b", proxy_password=SECRET, timeout=20))
            sock = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())  # a plain socket
            sock.setblocking(False)
            async with asyncssh.connect(sock=sock, host="localhost", port=port, username="feed",
                                        client_keys=[user_key], known_hosts=None) as conn, \
                    conn.start_sftp_client() as sftp, sftp.open("/feed.bin", "rb") as f:
                got = await f.read()
            rec = await loop.run_in_executor(None, gw.wait_log, lambda r: r["method"] == "SOCKS5")
            assert rec["egress_addr"] == "127.0.0.2" and rec["bytes_down"] >= len(data)
            return got
        except BaseException:
            print("LOG", gw.log, "ERR", "".join(gw.stderr_lines[-20:]))
            raise
        finally:
            server.close()
            await server.wait_closed()

    got = asyncio.run(run())
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert peers == ["127.0.0.2"]


# --- the same policy path as CONNECT ------------------------------------------------------------------

def _refused(gw, dest: bytes, code: int, reason: str, **kw) -> dict:
    s, got = _socks(gw, dest, **kw)
    assert got == code, (got, gw.log[-3:])
    assert _closed(s)
    return gw.wait_log(lambda r: r["method"] == "SOCKS5" and r.get("reason") == reason)


def test_refusals_map_onto_reply_codes(start_gateway, origin, blackhole):
    clients = [{"name": "job", "from": ["127.0.0.0/8"], "username": "job", "password_env": "JOB_SECRET",
                "allow": ["localhost", "127.0.0.1"], "deny": [f"127.0.0.1:{origin.port}"]}]
    gw = _socks_gw(start_gateway, origin.port, clients=clients)
    # not in the client's allow rules
    rec = _refused(gw, _domain("example.com", origin.port), 0x02, "destination_not_allowed")
    assert rec["status"] == 403 and rec["client"] == "job" and rec["socks_reply"] == "not_allowed"
    # a port neither in security.socks_ports (unset: connect_ports + 80, 8080) nor in the matching rule
    rec = _refused(gw, _domain("localhost", 22), 0x02, "socks_port_not_allowed")
    assert rec["status"] == 403
    # an explicit deny rule
    _refused(gw, _ipv4("127.0.0.1", origin.port), 0x02, "destination_denied")
    # nothing listens: connection refused
    with ClosedPort() as dead:
        gw2 = _socks_gw(start_gateway, dead.port)
        rec = _refused(gw2, _ipv4("127.0.0.1", dead.port), 0x05, "connection_refused")
        assert rec["status"] == 502 and rec["socks_reply"] == "connection_refused"
    # a dial that times out: TTL expired
    gw3 = _socks_gw(start_gateway, blackhole.port, egress={"default": {"direct": {}, "connect_timeout": "0.5s"}})
    rec = _refused(gw3, _ipv4("127.0.0.1", blackhole.port), 0x06, "connect_timeout")
    assert rec["status"] == 504


def test_socks5_has_its_own_port_rule(start_gateway, origin, tmp_path):
    """Defect (issue 29 item 12): SOCKS5 clients reaching plain HTTP on 80/8080 were refused by
    connect_ports (an HTTP-CONNECT notion), logged as connect_port_not_allowed. SOCKS5 now has
    security.socks_ports (unset: connect_ports plus 80 and 8080), its refusal says so, and
    explain names the rule."""
    gw = _socks_gw(start_gateway, 443)  # connect_ports: [443] only
    s, code = _socks(gw, _ipv4("127.0.0.1", 8080))  # the default SOCKS5 ports include 8080
    s.close()
    rec = gw.wait_log(lambda r: r["method"] == "SOCKS5" and r["target"].endswith(":8080"))
    assert rec["reason"] != "socks_port_not_allowed" and rec["status"] != 403, rec
    rec = _refused(gw, _ipv4("127.0.0.1", origin.port), 0x02, "socks_port_not_allowed")
    assert rec["socks_reply"] == "not_allowed"
    # explicit: socks_ports names exactly the SOCKS5 ports; HTTP CONNECT keeps connect_ports
    gw = _socks_gw(start_gateway, 443, security={"connect_ports": [443], "socks_ports": [origin.port]})
    s, code = _socks(gw, _ipv4("127.0.0.1", origin.port))
    assert code == 0
    s.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert _recv_exact(s, 12) == b"HTTP/1.1 200"
    s.close()
    import yaml

    path = tmp_path / "socks.yaml"
    path.write_text(yaml.safe_dump(base_config(security={"connect_ports": [443], "socks_ports": [1080, 8443]})))
    r = subprocess.run([sys.executable, "-m", "egressgate", "explain", "--config", str(path), "--client", "local",
                        "socks5://127.0.0.1:80"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "port rule:   security.socks_ports: 1080, 8443" in r.stdout, r.stdout + r.stderr
    assert "socks_port_not_allowed" in r.stdout, r.stdout
    r = subprocess.run([sys.executable, "-m", "egressgate", "explain", "--config", str(path), "--client", "local",
                        "127.0.0.1:8443"], capture_output=True, text=True, timeout=60)
    assert "port rule:   security.connect_ports: 443" in r.stdout and "connect_port_not_allowed" in r.stdout, r.stdout


def test_address_guard_after_the_gateways_own_resolution(start_gateway, origin):
    gw = start_gateway(base_config(listen=[{"address": "127.0.0.1:0", "protocol": "socks5"}],
                                   security={"connect_ports": [origin.port], "allow_private": []}))
    # "localhost" is resolved by the gateway, then judged: a loopback address is refused
    s, code = _socks(gw, _domain("localhost", origin.port), user=None)
    assert code == 0x02 and _closed(s)
    rec = gw.wait_log(lambda r: r["method"] == "SOCKS5")
    assert rec["reason"] == "destination_ip_prohibited" and rec["target"] == f"localhost:{origin.port}"
    s, code = _socks(gw, b"\x04" + socket.inet_pton(socket.AF_INET6, "::1") + struct.pack(">H", origin.port),
                     user=None)
    assert code == 0x02 and _closed(s)
    gw.wait_log(lambda r: r["method"] == "SOCKS5" and r["target"] == f"[::1]:{origin.port}")


def test_report_mode_lets_through_and_records(start_gateway, origin):
    clients = [{"name": "job", "from": ["127.0.0.0/8"], "allow": ["nothing.example"], "mode": "report"}]
    gw = _socks_gw(start_gateway, origin.port, clients=clients)
    r = curl("-x", f"socks5h://{gw.address}", origin.url("/ip", host="localhost"))
    assert r.stdout == b"127.0.0.1", r.stderr
    rec = gw.wait_log(lambda r: r["method"] == "SOCKS5")
    assert rec["would_deny"] == "destination_not_allowed" and rec["status"] == 200


def test_authentication(start_gateway, origin):
    gw = _socks_gw(start_gateway, origin.port)
    # wrong password: RFC 1929 failure, the record names the user tried
    s, code = _socks(gw, _domain("localhost", origin.port), password=b"wrong")
    assert code == -2 and _closed(s)
    rec = gw.wait_log(lambda r: r["method"] == "SOCKS5" and r.get("reason") == "bad_credentials")
    assert rec["status"] == 407 and rec["user"] == "job" and rec["socks_reply"] == "auth_failed"
    # an unknown profile in user+profile
    s, code = _socks(gw, _domain("localhost", origin.port), user=b"job+nope")
    assert code == 0x02 and _closed(s)
    gw.wait_log(lambda r: r["method"] == "SOCKS5" and r.get("reason") == "profile_not_allowed")
    # "no authentication" is not offered to a client that needs credentials
    s = socket.create_connection((gw.host, gw.port), timeout=10)
    s.sendall(b"\x05\x01\x00")
    assert _recv_exact(s, 2) == b"\x05\xff" and _closed(s)
    gw.wait_log(lambda r: r["method"] == "SOCKS5" and r.get("reason") == "socks_no_acceptable_method")
    # curl with the right credentials works; without, it fails cleanly
    assert curl("-x", f"socks5h://job:{SECRET}@{gw.address}", origin.url("/ip", host="localhost")).returncode == 0
    assert curl("-x", f"socks5h://{gw.address}", origin.url("/ip", host="localhost")).returncode != 0


def test_per_client_limit(start_gateway, echo):
    clients = [{"name": "job", "from": ["127.0.0.0/8"], "max_connections": 1}]
    gw = _socks_gw(start_gateway, echo.port, clients=clients)
    first, code = _socks(gw, _ipv4("127.0.0.1", echo.port), user=None)
    assert code == 0
    first.sendall(b"ping")
    assert _recv_exact(first, 4) == b"ping"
    second, code = _socks(gw, _ipv4("127.0.0.1", echo.port), user=None)
    assert code == 0x02 and _closed(second)
    gw.wait_log(lambda r: r["method"] == "SOCKS5" and r.get("reason") == "connection_limit_reached")
    first.close()


def test_chained_through_an_http_proxy(start_gateway, origin):
    far = start_gateway(base_config(security={"connect_ports": [origin.port]}))
    gw = _socks_gw(start_gateway, origin.port, clients=[{"name": "job", "from": ["127.0.0.0/8"], "egress": ["far"]}],
                   egress={"far": {"upstream": [far.url]}})
    r = curl("-x", f"socks5h://{gw.address}", origin.url("/bytes?n=200000", host="localhost"))
    assert hashlib.sha256(r.stdout).hexdigest() == pattern_sha256(200000), r.stderr
    far.wait_log(lambda r: r["method"] == "CONNECT" and r["target"] == f"localhost:{origin.port}")
    rec = gw.wait_log(lambda r: r["method"] == "SOCKS5")
    assert rec["profile"] == "far" and rec["bytes_down"] > 200000


# --- hostile negotiation ----------------------------------------------------------------------------

@pytest.mark.parametrize("data, answer, reason", [
    (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", b"\x00\x5b\x00\x00\x00\x00\x00\x00", "socks_version"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"", "socks_version"),
    (b"\x05\x00", b"\x05\xff", "socks_no_method"),
    (b"\x05\x01\x00\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50", b"\x05\x00\x05\x07", "socks_command"),
    (b"\x05\x01\x00\x05\x03\x00\x01\x7f\x00\x00\x01\x00\x50", b"\x05\x00\x05\x07", "socks_command"),
    (b"\x05\x01\x00\x05\x01\x00\x09\x00", b"\x05\x00\x05\x08", "socks_address_type"),
    (b"\x05\x01\x00\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50", b"\x05\x00\x05\x01", "socks_version"),
    (b"\x05\x01\x00\x05\x01\x00\x03\x00\x00\x50", b"\x05\x00\x05\x01", "bad_host"),
    (b"\x05\x01\x00\x05\x01\x00\x03\x03a b\x00\x50", b"\x05\x00\x05\x01", "bad_host"),
    (b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x00", b"\x05\x00\x05\x01", "bad_port"),
    (b"\x05\x01\x02\x02\x03job\x00", b"\x05\x02\x01\x01", "socks_auth_version"),
    (b"\x05\x01\x02\x01\x00\x00", b"\x05\x02\x01\x01", "bad_credentials"),
], ids=["socks4", "http", "no-methods", "bind", "udp-associate", "address-type", "request-version",
        "empty-name", "space-in-name", "port-0", "auth-version", "empty-user"])
def test_hostile_negotiation_is_answered_then_closed(start_gateway, data, answer, reason):
    clients = [{"name": "anon", "from": ["127.0.0.0/8"]}]
    gw = _socks_gw(start_gateway, 443, clients=clients + [{"name": "job", "from": ["127.0.0.0/8"],
                                                            "username": "job", "password_env": "JOB_SECRET"}])
    got = raw_exchange(gw.address, data)
    assert got[:len(answer)] == answer and len(got) <= len(answer) + 8, got
    rec = gw.wait_log(lambda r: r["method"] == "SOCKS5")
    assert rec["reason"] == reason and rec["status"] in (400, 407), rec
    assert len(gw.log) == 1


def test_truncated_and_slow_negotiations(start_gateway):
    gw = _socks_gw(start_gateway, 443, clients=[{"name": "anon", "from": ["127.0.0.0/8"]}],
                   timeouts={"client_head": "1s"})
    fds = gw.fd_count()
    # a greeting cut short by the client: its 499 record, nothing left open
    s = socket.create_connection((gw.host, gw.port), timeout=10)
    s.sendall(b"\x05\x02\x00")
    s.close()
    rec = gw.wait_log(lambda r: r["method"] == "SOCKS5" and r["status"] == 499)
    assert rec["reason"] == "client_closed"
    # a client that stops after the method exchange is closed at timeouts.client_head
    s = socket.create_connection((gw.host, gw.port), timeout=20)
    s.sendall(b"\x05\x01\x00\x05\x01")
    assert _recv_exact(s, 2) == b"\x05\x00"
    assert _closed(s)
    rec = gw.wait_log(lambda r: r["method"] == "SOCKS5" and r["status"] == 408)
    assert rec["reason"] == "client_timeout" and rec["socks_reply"] == "timeout"
    deadline = time.monotonic() + 10  # (the lingering close lets go once we have closed)
    while gw.fd_count() > fds and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.fd_count() <= fds


def test_client_gone_while_dialing_abandons_the_dial(start_gateway, blackhole):
    gw = _socks_gw(start_gateway, blackhole.port, clients=[{"name": "anon", "from": ["127.0.0.0/8"]}])
    s = socket.create_connection((gw.host, gw.port), timeout=10)
    s.sendall(b"\x05\x01\x00" + b"\x05\x01\x00" + _ipv4("127.0.0.1", blackhole.port))
    assert _recv_exact(s, 2) == b"\x05\x00"
    s.close()
    rec = gw.wait_log(lambda r: r["method"] == "SOCKS5")
    assert rec["status"] == 499 and rec["reason"] == "client_closed"


# --- drain and reload -------------------------------------------------------------------------------

def test_drain_lets_a_socks_tunnel_finish(start_gateway, echo):
    gw = _socks_gw(start_gateway, echo.port, clients=[{"name": "anon", "from": ["127.0.0.0/8"]}],
                   drain={"timeout": 20})
    s, code = _socks(gw, _ipv4("127.0.0.1", echo.port), user=None)
    assert code == 0
    gw.signal(signal.SIGTERM)
    gw.wait_event("drain_started")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the listener closes (drain.grace is 0)
        try:
            socket.create_connection((gw.host, gw.port), timeout=5).close()
        except ConnectionRefusedError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the SOCKS5 listener still accepts during drain")
    assert gw.proc.poll() is None, "the gateway exited with a SOCKS5 tunnel open"
    data = bytes(range(256)) * 4096
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    got = _recv_exact(s, len(data) + 1)
    s.close()
    assert got == data
    assert gw.wait(timeout=30) == 0
    rec = gw.wait_log(lambda r: r["method"] == "SOCKS5")
    assert rec["status"] == 200 and rec["bytes_up"] == len(data) == rec["bytes_down"]


def test_drain_timeout_closes_a_negotiation_and_a_tunnel_with_records(start_gateway, echo):
    gw = _socks_gw(start_gateway, echo.port, clients=[{"name": "anon", "from": ["127.0.0.0/8"]}],
                   drain={"timeout": "500ms"})
    tunnel, code = _socks(gw, _ipv4("127.0.0.1", echo.port), user=None)
    assert code == 0
    half = socket.create_connection((gw.host, gw.port), timeout=20)
    half.sendall(b"\x05\x01\x00\x05")  # methods, then a request cut short
    assert _recv_exact(half, 2) == b"\x05\x00"
    gw.signal(signal.SIGTERM)
    assert _closed(tunnel) and _closed(half)
    assert gw.wait(timeout=30) == 0
    reasons = sorted((r["status"], r["reason"]) for r in gw.log if r["method"] == "SOCKS5")
    assert reasons == [(200, "drain_timeout"), (503, "drain_timeout")], reasons


def test_reload_switches_a_listener_between_http_and_socks5(start_gateway, origin):
    gw = start_gateway(base_config(security={"connect_ports": [origin.port]}))
    assert curl("-x", gw.url, origin.url("/r")).returncode == 0
    cfg = base_config(listen=[{"address": gw.address, "protocol": "socks5"}],
                      admin={"address": gw.admin.removeprefix("http://")},
                      security={"connect_ports": [origin.port]})
    gw.write_config(cfg)
    n = len(gw.events)
    gw.signal(signal.SIGHUP)
    gw.wait_event("reloaded", after=n)
    r = curl("-x", f"socks5h://{gw.address}", origin.url("/r", host="localhost"))
    assert r.returncode == 0 and r.stdout == b"hello /r\n", r.stderr
    gw.wait_log(lambda r: r["method"] == "SOCKS5" and r["status"] == 200)
    info = [ln for ln in _get(gw.admin + "/metrics").splitlines() if ln.startswith("egressgate_listener_info{")]
    assert info == [f'egressgate_listener_info{{listener="{gw.address}",protocol="socks5"}} 1.0'], info


def test_squid_log_format(start_gateway, origin):
    gw = _socks_gw(start_gateway, origin.port, clients=[{"name": "anon", "from": ["127.0.0.0/8"]}],
                   log={"format": "squid"})
    assert curl("-x", f"socks5h://{gw.address}", origin.url("/ip", host="localhost")).returncode == 0
    deadline = time.monotonic() + 10
    while not gw.stdout_lines() and time.monotonic() < deadline:
        time.sleep(0.02)
    fields = gw.stdout_lines()[0].split()
    assert fields[3] == "TCP_TUNNEL/200" and fields[5] == "SOCKS5" and fields[6] == f"localhost:{origin.port}", fields


def test_gateway_connection_limit_closes_without_an_http_answer(start_gateway):
    gw = _socks_gw(start_gateway, 443, clients=[{"name": "anon", "from": ["127.0.0.0/8"]}],
                   limits={"max_connections": 1})
    first = socket.create_connection((gw.host, gw.port), timeout=10)
    first.sendall(b"\x05\x01\x00")
    assert _recv_exact(first, 2) == b"\x05\x00"  # (admitted: it holds the one connection)
    assert raw_exchange(gw.address, b"\x05\x01\x00") == b""
    first.close()


def test_ipv6_destination(start_gateway):
    lsock = required.ipv6_loopback()
    port = lsock.getsockname()[1]
    try:
        gw = _socks_gw(start_gateway, port, clients=[{"name": "anon", "from": ["127.0.0.0/8"]}])
        s, code = _socks(gw, b"\x04" + socket.inet_pton(socket.AF_INET6, "::1") + struct.pack(">H", port), user=None)
        assert code == 0
        conn, peer = lsock.accept()
        conn.sendall(b"over v6")
        assert _recv_exact(s, 7) == b"over v6"
        s.close()
        conn.close()
        rec = gw.wait_log(lambda r: r["method"] == "SOCKS5")
        assert rec["target"] == f"[::1]:{port}" and rec["upstream_addr"] == "::1" and rec["status"] == 200
    finally:
        lsock.close()
