"""Lock-down: a table of hostile requests, each with its expected status, against a gateway
whose only allowed private address is the test origin's (127.0.0.2) and whose names are
answered by a DNS server the test runs. Plus the gate at accept, PROXY protocol, mTLS,
per-client limits, report mode and `egressgate explain`."""

from __future__ import annotations

import base64
import select
import socket
import ssl
import subprocess
import sys

import pytest
import yaml

from .dnsserver import Changing, DnsServer
from .faulty import read_until_close
from .peers import GatewayProcess, Origin, Tripwire, base_config, connect, raw_exchange, read_head, wait_for

PASSWORD = "pw-123"
REFUSED_BUT_REACHABLE = "127.0.0.3"


@pytest.fixture(scope="module")
def password_hash() -> str:
    r = subprocess.run([sys.executable, "-m", "egressgate", "hash-password", "--allow-short"], input=PASSWORD, text=True,
                       capture_output=True, check=True, timeout=30)
    return r.stdout.strip()


@pytest.fixture(scope="module")
def origin2():
    o = Origin(host="127.0.0.2")
    yield o
    o.close()


@pytest.fixture(scope="module")
def tripwire(origin2):
    """Listens on a loopback address the guard refuses (only 127.0.0.2 is allowed), on the
    origin's port: a gateway that connected to anything but the address it checked lands here."""
    t = Tripwire(REFUSED_BUT_REACHABLE, origin2.port)
    yield t
    t.close()


@pytest.fixture(scope="module")
def dns_server():
    d = DnsServer({
        "internal.test": ["10.0.0.5"], "rebind.test": ["127.0.0.1"], "meta.test": ["169.254.169.254"],
        "mapped.test": ["::ffff:127.0.0.1"], "cgnat.test": ["100.64.0.1"], "public.test": ["127.0.0.2"],
        # a refused address the gateway could reach (the tripwire listens there) comes first
        "mixed.test": [REFUSED_BUT_REACHABLE, "127.0.0.2"], "a.example.com": ["127.0.0.2"],
        # DNS rebinding: a permitted answer for the first lookup, a refused one for every later one
        "rebinding.test": Changing(["127.0.0.2"], [REFUSED_BUT_REACHABLE]),
        "blocked.example.com": ["127.0.0.2"], "evil-example.com": ["127.0.0.2"],
        "example.com.evil.net": ["127.0.0.2"], "evil.test": ["127.0.0.2"],
    })
    yield d
    d.close()


def _config(password_hash: str, dns_server: DnsServer, origin2: Origin, **extra) -> dict:
    cfg = base_config(
        security={"allow_private": ["127.0.0.2/32"], "connect_ports": [443, origin2.port]},
        dns={"servers": [dns_server.address]},
        clients=[
            {"name": "open", "from": ["127.0.0.1/32"], "username": "open", "password_hash": password_hash},
            {"name": "crawler", "from": ["127.0.0.1/32"], "username": "crawler", "password_hash": password_hash,
             "allow": ["*.example.com", f"public.test:{origin2.port}"], "deny": ["blocked.example.com"]},
        ],
        **extra)
    return cfg


@pytest.fixture(scope="module")
def gw(tmp_path_factory, password_hash, dns_server, origin2):
    g = GatewayProcess(_config(password_hash, dns_server, origin2), tmp_path_factory.mktemp("lockdown"))
    yield g
    g.kill()


def _auth(user: str, password: str = PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1]) if resp.startswith(b"HTTP/") else 0


def _proxy_status(resp: bytes) -> str:
    for line in resp.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"proxy-status:"):
            return line.split(b"error=", 1)[1].split(b";", 1)[0].decode()
    return ""


P = "{port}"  # the origin's port, filled in per test
# (id, user, method, target, expected status, expected Proxy-Status error or "")
CASES = [
    ("allowed-ip-literal", "open", "GET", "http://127.0.0.2:{port}/x", 200, ""),
    ("allowed-name", "open", "GET", "http://public.test:{port}/x", 200, ""),
    ("mixed-answers-use-public-one", "open", "GET", "http://mixed.test:{port}/x", 200, ""),
    ("no-credentials", None, "GET", "http://127.0.0.2:{port}/x", 407, "http_request_denied"),
    ("wrong-password", "open:nope", "GET", "http://127.0.0.2:{port}/x", 407, "http_request_denied"),
    ("unknown-user", "nobody", "GET", "http://127.0.0.2:{port}/x", 407, "http_request_denied"),
    ("malformed-credentials", "!!garbage!!", "GET", "http://127.0.0.2:{port}/x", 407, "http_request_denied"),  # a 407 challenge, so clients retry
    ("loopback", "open", "GET", "http://127.0.0.1:{port}/", 403, "destination_ip_prohibited"),
    ("loopback-short", "open", "GET", "http://127.1:{port}/", 400, "http_request_error"),
    ("loopback-decimal", "open", "GET", "http://2130706433:{port}/", 400, "http_request_error"),
    ("loopback-hex", "open", "GET", "http://0x7f.1:{port}/", 400, "http_request_error"),
    ("loopback-octal", "open", "GET", "http://0177.0.0.1:{port}/", 400, "http_request_error"),
    ("loopback-v6", "open", "GET", "http://[::1]:{port}/", 403, "destination_ip_prohibited"),
    ("loopback-mapped", "open", "GET", "http://[::ffff:127.0.0.1]:{port}/", 403, "destination_ip_prohibited"),
    ("loopback-mapped-hex", "open", "GET", "http://[::ffff:7f00:1]:{port}/", 403, "destination_ip_prohibited"),
    ("loopback-nat64", "open", "GET", "http://[64:ff9b::7f00:1]:{port}/", 403, "destination_ip_prohibited"),
    ("loopback-6to4", "open", "GET", "http://[2002:7f00:1::1]:{port}/", 403, "destination_ip_prohibited"),
    ("localhost-name", "open", "GET", "http://localhost:{port}/", 403, "destination_ip_prohibited"),
    ("metadata-ip", "open", "GET", "http://169.254.169.254/computeMetadata/v1/", 403, "destination_ip_prohibited"),
    ("metadata-name", "open", "GET", "http://metadata.google.internal/", 403, "destination_ip_prohibited"),
    ("metadata-name-dot", "open", "GET", "http://METADATA.google.internal./", 403, "destination_ip_prohibited"),
    ("metadata-v6", "open", "GET", "http://[fd00:ec2::254]/", 403, "destination_ip_prohibited"),
    ("metadata-mapped", "open", "GET", "http://[::ffff:169.254.169.254]/", 403, "destination_ip_prohibited"),
    ("metadata-decimal", "open", "GET", "http://2852039166/", 400, "http_request_error"),
    ("name-to-private", "open", "GET", "http://internal.test/", 403, "destination_ip_prohibited"),
    ("name-to-loopback", "open", "GET", "http://rebind.test:{port}/", 403, "destination_ip_prohibited"),
    ("name-to-metadata", "open", "GET", "http://meta.test/", 403, "destination_ip_prohibited"),
    ("name-to-mapped-v6", "open", "GET", "http://mapped.test:{port}/", 403, "destination_ip_prohibited"),
    ("name-to-cgnat", "open", "GET", "http://cgnat.test/", 403, "destination_ip_prohibited"),
    ("unknown-name", "open", "GET", "http://nxdomain.test/", 502, "dns_error"),
    ("connect-port", "open", "CONNECT", "127.0.0.2:25", 403, "http_request_denied"),
    ("connect-port-allowed", "open", "CONNECT", "127.0.0.2:{port}", 200, ""),
    ("wildcard-subdomain", "crawler", "CONNECT", "a.example.com:443", 502, "connection_refused"),
    ("wildcard-not-apex-lookalike", "crawler", "GET", "http://evil-example.com:{port}/", 403, "http_request_denied"),
    ("wildcard-not-suffix-trick", "crawler", "GET", "http://example.com.evil.net:{port}/", 403,
     "http_request_denied"),
    ("deny-beats-allow", "crawler", "GET", "http://blocked.example.com:{port}/", 403, "http_request_denied"),
    ("rule-with-port", "crawler", "GET", "http://public.test:{port}/x", 200, ""),
    ("rule-with-port-other-port", "crawler", "GET", "http://public.test:1/x", 403, "http_request_denied"),
    ("userinfo-trick", "open", "GET", "http://127.0.0.2:{port}@evil.test/", 400, "http_request_error"),
    ("fragment-trick", "crawler", "GET", "http://evil.test:{port}#@a.example.com/", 400, "http_request_error"),
    ("https-absolute", "open", "GET", "https://127.0.0.2:{port}/", 400, "http_request_error"),
    ("origin-form", "open", "GET", "/etc/passwd", 400, "http_request_error"),
    ("profile-not-allowed", "open", "GET+profile", "http://127.0.0.2:{port}/x", 403, "http_request_denied"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_request(gw, origin2, tripwire, case):
    name, user, method, target, status, error = case
    target = target.format(port=origin2.port)
    headers = ""
    if user is not None:
        if ":" in user:
            u, pw = user.split(":", 1)
            headers += f"Proxy-Authorization: {_auth(u, pw)}\r\n"
        elif user.startswith("!!"):
            headers += "Proxy-Authorization: Basic !!!not-base64!!!\r\n"
        else:
            headers += f"Proxy-Authorization: {_auth(user)}\r\n"
    if method == "GET+profile":
        method = "GET"
        headers += "X-Egressgate-Profile: elsewhere\r\n"
    req = f"{method} {target} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode()
    resp = raw_exchange(gw.address, req, read_until_close=False, timeout=10)
    assert not tripwire.touched(), "the gateway connected to an address the guard refuses"
    if method == "CONNECT" and status == 200:
        assert resp.startswith(b"HTTP/1.1 200 Connection established"), resp[:200]
        return
    assert _status(resp) == status, resp[:400]
    if status == 200:
        assert resp.endswith(b"hello /x\n"), resp[-200:]  # the origin answered, not the tripwire
    if error:
        assert _proxy_status(resp) == error, resp[:400]
        body = resp.split(b"\r\n\r\n", 1)[1]
        assert body.startswith(str(status).encode()) and body.count(b"\n") == 1


def _metric(gw, name: str) -> float:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(gw.admin + "/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_every_denial_is_logged_and_counted(gw, origin2):
    denied = 'egressgate_denied_total{reason="destination_ip_prohibited"}'
    start, before = len(gw.log), _metric(gw, denied)
    target = "http://internal.test/only-this-once"
    resp = raw_exchange(gw.address, f"GET {target} HTTP/1.1\r\nProxy-Authorization: {_auth('open')}\r\n"
                        "Connection: close\r\n\r\n".encode())
    assert _status(resp) == 403
    # a request after it: once its record is written, every record of the denial is too
    marker = raw_exchange(gw.address, f"GET http://egressgate.whoami/ HTTP/1.1\r\nProxy-Authorization: "
                          f"{_auth('open')}\r\nConnection: close\r\n\r\n".encode())
    assert _status(marker) == 200
    gw.wait_log(lambda r: r["target"] == "http://egressgate.whoami/" and gw.log.index(r) >= start)
    new = [r for r in gw.log[start:] if r["target"] != "http://egressgate.whoami/"]
    assert len(new) == 1, new
    rec = new[0]
    assert rec["target"] == target and rec["status"] == 403, rec
    assert rec["reason"] == "destination_ip_prohibited" and rec["client"] == "open", rec
    assert _metric(gw, denied) - before == 1


def test_connects_only_to_the_address_it_checked(gw, origin2, tripwire, dns_server):
    """Mixed answers (a refused address first) and answers that change between lookups (DNS
    rebinding): the gateway connects to an address the guard passed, and only to it."""
    auth = f"Proxy-Authorization: {_auth('open')}\r\n"
    first = raw_exchange(gw.address, f"GET http://rebinding.test:{origin2.port}/x HTTP/1.1\r\n{auth}\r\n".encode(),
                         read_until_close=False)
    assert _status(first) == 200 and first.endswith(b"hello /x\n"), first[-200:]
    # the name now points at the refused address: refused, not connected to
    later = raw_exchange(gw.address, f"GET http://rebinding.test:{origin2.port}/x HTTP/1.1\r\n{auth}\r\n".encode(),
                         read_until_close=False)
    assert _status(later) == 403 and _proxy_status(later) == "destination_ip_prohibited", later[:300]
    assert dns_server.queries.count("rebinding.test") >= 2  # the answers really did change
    assert not tripwire.touched(), "the gateway connected to an address the guard refuses"
    mixed = raw_exchange(gw.address, f"GET http://mixed.test:{origin2.port}/x HTTP/1.1\r\n{auth}\r\n".encode(),
                         read_until_close=False)
    assert _status(mixed) == 200 and mixed.endswith(b"hello /x\n"), mixed[-200:]
    assert not tripwire.touched(), "the gateway connected to an address the guard refuses"


def test_disallowed_source_closed_before_parsing(gw):
    s = socket.socket()
    s.bind(("127.0.0.9", 0))
    s.settimeout(5)
    s.connect((gw.host, gw.port))
    try:
        s.sendall(b"GET http://127.0.0.2/ HTTP/1.1\r\n\r\n")
        data = s.recv(100)
    except ConnectionResetError:
        data = b""
    s.close()
    assert data == b""  # nothing learned: no banner, no status line


def test_proxy_protocol(start_gateway, origin2, password_hash, dns_server):
    cfg = _config(password_hash, dns_server, origin2)
    cfg["listen"] = [{"address": "127.0.0.1:0", "proxy_protocol": True, "trusted_proxies": ["127.0.0.1/32"]}]
    cfg["clients"] = [{"name": "behind-lb", "from": ["198.51.100.7/32"]}]
    gw = start_gateway(cfg)
    req = f"GET http://127.0.0.2:{origin2.port}/ip HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    # v1 header naming an allowed client
    resp = raw_exchange(gw.address, b"PROXY TCP4 198.51.100.7 10.0.0.1 5555 3128\r\n" + req, read_until_close=False)
    assert _status(resp) == 200
    rec = gw.wait_log(lambda r: r["client"] == "behind-lb")
    assert rec["client_addr"] == "198.51.100.7"
    # v2 header, binary
    import struct

    v2 = (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", 12)
          + socket.inet_aton("198.51.100.7") + socket.inet_aton("10.0.0.1") + struct.pack("!HH", 5555, 3128))
    assert _status(raw_exchange(gw.address, v2 + req, read_until_close=False)) == 200
    # a header naming a client no rule admits: closed without a word (raw_exchange fails
    # unless the gateway closes the connection within its bound)
    assert raw_exchange(gw.address, b"PROXY TCP4 203.0.113.1 10.0.0.1 5555 3128\r\n" + req) == b""
    # no header at all: closed without a word
    assert raw_exchange(gw.address, req) == b""
    # PROXY protocol from an untrusted address: closed at accept
    s = socket.socket()
    s.bind(("127.0.0.8", 0))
    s.settimeout(5)
    s.connect((gw.host, gw.port))
    try:
        s.sendall(b"PROXY TCP4 198.51.100.7 10.0.0.1 5555 3128\r\n" + req)
        data = s.recv(100)
    except ConnectionResetError:
        data = b""
    s.close()
    assert data == b""


def test_mtls_client_certificates(start_gateway, origin2, ca, tmp_path):
    import trustme

    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "clients-ca.pem"))
    cfg = base_config(
        listen=[{"address": "127.0.0.1:0", "tls": {"cert": str(tmp_path / "server.pem"),
                                                   "key": str(tmp_path / "server.pem"),
                                                   "client_ca": str(tmp_path / "clients-ca.pem")}}],
        security={"allow_private": ["127.0.0.2/32"], "connect_ports": [origin2.port]},
        clients=[{"name": "job-cert", "cert_subject": "job-cert"}])
    gw = start_gateway(cfg)

    def request(cert: trustme.LeafCert | None) -> bytes:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "clients-ca.pem"))
        if cert is not None:
            cert.configure_cert(ctx)
        with socket.create_connection((gw.host, gw.port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(f"GET http://127.0.0.2:{origin2.port}/ip HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            return read_head(s, partial=True)

    good = ca.issue_cert("job-cert", common_name="job-cert")
    assert _status(request(good)) == 200
    assert _status(request(None)) == 403  # no certificate, no other rule: refused
    stranger = trustme.CA().issue_cert("job-cert", common_name="job-cert")  # same name, unknown CA
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        data = request(stranger)
        if not data:
            raise ConnectionResetError("closed")


def test_per_client_connection_limit(start_gateway, origin2):
    cfg = base_config(security={"allow_private": ["127.0.0.2/32"], "connect_ports": [origin2.port]},
                      clients=[{"name": "small", "from": ["127.0.0.0/8"], "max_connections": 2}])
    gw = start_gateway(cfg)
    held = []
    for _ in range(2):
        s = socket.create_connection((gw.host, gw.port), timeout=5)
        s.sendall(f"CONNECT 127.0.0.2:{origin2.port} HTTP/1.1\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 200")
        held.append(s)
    resp = raw_exchange(gw.address, f"CONNECT 127.0.0.2:{origin2.port} HTTP/1.1\r\n\r\n".encode(),
                        read_until_close=False)
    assert _status(resp) == 429 and _proxy_status(resp) == "connection_limit_reached"
    assert b"\r\nRetry-After: 1\r\n" in resp.partition(b"\r\n\r\n")[0] + b"\r\n", resp[:300]
    held.pop().close()
    wait_for(lambda: _admin_status(gw)["connections"]["by_client"].get("small") == 1,
             "the closed connection to stop counting against the client")
    resp = raw_exchange(gw.address, f"GET http://127.0.0.2:{origin2.port}/x HTTP/1.1\r\n\r\n".encode(),
                        read_until_close=False)
    assert _status(resp) == 200
    for s in held:
        s.close()


def _admin_status(gw) -> dict:
    import json
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return json.loads(opener.open(gw.admin + "/status", timeout=10).read())


def test_report_mode_logs_and_allows(start_gateway, origin2):
    cfg = base_config(security={"allow_private": ["127.0.0.2/32"]},
                      clients=[{"name": "trial", "from": ["127.0.0.0/8"], "mode": "report",
                                "allow": ["*.example.com"]}])
    gw = start_gateway(cfg)
    resp = raw_exchange(gw.address, f"GET http://127.0.0.2:{origin2.port}/x HTTP/1.1\r\n\r\n".encode(),
                        read_until_close=False)
    assert _status(resp) == 200
    rec = gw.wait_log(lambda r: r["client"] == "trial")
    assert rec["would_deny"] == "destination_not_allowed"
    # safety checks are never relaxed by report mode
    resp = raw_exchange(gw.address, b"GET http://169.254.169.254/ HTTP/1.1\r\n\r\n", read_until_close=False)
    assert _status(resp) == 403


def test_explain(tmp_path, password_hash, dns_server, origin2):
    path = tmp_path / "explain.yaml"
    path.write_text(yaml.safe_dump(_config(password_hash, dns_server, origin2)))
    cmd = [sys.executable, "-m", "egressgate", "explain", "--config", str(path), "--client", "crawler"]
    r = subprocess.run([*cmd, "--from", "127.0.0.1", "https://a.example.com/"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ALLOW: allowed (rule: *.example.com)" in r.stdout and "127.0.0.2  allowed" in r.stdout
    r = subprocess.run([*cmd, "example.com.evil.net:443"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "DENY: destination_not_allowed" in r.stdout
    r = subprocess.run([*cmd[:-1], "open", "http://internal.test/"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "10.0.0.5  refused: private" in r.stdout
    r = subprocess.run([*cmd, "--from", "10.9.9.9", "https://a.example.com/"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1 and "NOT in this client's 'from'" in r.stdout


def test_tls_certificate_reloads_with_the_config(start_gateway, ca, tmp_path):
    def write(cn: str) -> None:
        cert = ca.issue_cert("localhost", "127.0.0.1", common_name=cn)
        cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "proxy.pem"))

    def served_cn() -> str:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        with socket.create_connection((gw.host, gw.port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as s:
            subject = dict(item[0] for item in s.getpeercert()["subject"])
            return subject["commonName"]

    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    write("first")
    cfg = base_config(listen=[{"address": "127.0.0.1:0",
                               "tls": {"cert": str(tmp_path / "proxy.pem"), "key": str(tmp_path / "proxy.pem")}}])
    gw = start_gateway(cfg)
    assert served_cn() == "first"
    write("second")  # the operator rotates the certificate ...
    cfg["listen"] = [{"address": gw.address, "tls": cfg["listen"][0]["tls"]}]
    cfg["admin"] = {"address": gw.admin.removeprefix("http://")}
    gw.write_config(cfg)
    n = len(gw.events)
    import signal

    gw.signal(signal.SIGHUP)  # ... and reloads: new handshakes present the new certificate
    gw.wait_event("reloaded", after=n)
    assert served_cn() == "second"


def _whoami(user: str | None, password: str = PASSWORD) -> bytes:
    auth = f"Proxy-Authorization: {_auth(user, password)}\r\n" if user else ""
    return f"GET http://egressgate.whoami/ HTTP/1.1\r\nHost: egressgate.whoami\r\n{auth}Connection: close\r\n\r\n".encode()


def test_repeated_wrong_passwords_slow_down_that_address(start_gateway, password_hash):
    """After five failures from one address, its further checks wait (0.2 s more for each
    failure beyond four); another address is not slowed. Checked by order, not by a clock:
    the slowed address asks first, with the same credentials as the other, and is answered
    only after it."""
    gw = start_gateway(base_config(clients=[{"name": "job", "from": ["127.0.0.0/8"], "username": "job",
                                             "password_hash": password_hash}]))
    failures = 9  # the next check from 127.0.0.1 waits 1 s before its scrypt run
    for i in range(failures):  # each a different wrong password: each needs a real check
        resp = raw_exchange(gw.address, _whoami("job", f"wrong-{i}"), timeout=30)
        assert _status(resp) == 407, resp[:300]
    slowed = connect(gw.address, timeout=30)  # from 127.0.0.1
    other = connect(gw.address, source="127.0.0.2", timeout=30)
    try:
        slowed.sendall(_whoami("job"))
        other.sendall(_whoami("job"))
        answer, how = read_until_close(other, 30)
        assert how == "eof" and _status(answer) == 200, (how, answer[:300])
        # without the slow-down both share one password check and 127.0.0.1, which asked
        # first, is answered first
        waiting, _, _ = select.select([slowed], [], [], 0)
        assert not waiting, "the address with nine failures was not slowed down"
        answer, how = read_until_close(slowed, 30)
        assert how == "eof" and _status(answer) == 200, (how, answer[:300])  # slowed, not refused
    finally:
        slowed.close()
        other.close()


def test_new_connections_per_second_are_limited(start_gateway, origin2):
    cfg = base_config(clients=[{"name": "burst", "from": ["127.0.0.0/8"], "max_new_per_second": 1}])
    gw = start_gateway(cfg)
    assert _status(raw_exchange(gw.address, _whoami(None))) == 200  # the bucket holds one
    statuses = []
    for _ in range(10):  # as fast as we can: the bucket refills at one per second
        resp = raw_exchange(gw.address, _whoami(None))
        statuses.append(_status(resp))
        if statuses[-1] == 429:
            assert _proxy_status(resp) == "connection_limit_reached", resp[:300]
            assert b"\r\nRetry-After: 1\r\n" in resp.partition(b"\r\n\r\n")[0] + b"\r\n", resp[:300]
            break
    assert statuses[-1] == 429, f"ten new connections in a row were all admitted: {statuses}"
    rec = gw.wait_log(lambda r: r["status"] == 429)
    assert rec["reason"] == "rate_limited", rec
    assert _metric(gw, 'egressgate_denied_total{reason="rate_limited"}') == 1
    # the bucket refills: a later connection is admitted again
    wait_for(lambda: _status(raw_exchange(gw.address, _whoami(None))) == 200, "a connection admitted after the refill",
             interval=0.1)


def test_fractional_new_connection_rate_admits_the_first(start_gateway):
    cfg = base_config(clients=[{"name": "slow", "from": ["127.0.0.0/8"], "max_new_per_second": 0.5}])
    gw = start_gateway(cfg)
    assert _status(raw_exchange(gw.address, _whoami(None))) == 200  # one connection every two seconds


def test_limit_refusal_names_the_client_in_the_access_log(start_gateway):
    cfg = base_config(clients=[{"name": "burst", "from": ["127.0.0.0/8"], "max_connections": 1}])
    gw = start_gateway(cfg)
    with connect(gw.address) as held:
        held.sendall(b"GET http://egressgate.whoami/ HTTP/1.1\r\nHost: egressgate.whoami\r\n\r\n")
        assert held.recv(100).startswith(b"HTTP/1.1 200")
        assert _status(raw_exchange(gw.address, _whoami(None))) == 429
    rec = gw.wait_log(lambda r: r["status"] == 429)
    assert rec["client"] == "burst", rec
