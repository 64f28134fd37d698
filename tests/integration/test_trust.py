"""Issue 11, trust at the edges: what a hostile client or a careless reload must never get.

- a reset right after connect (and at every later phase) gives back its descriptor;
- two Host fields, an invalid Host: 400 and close; malformed Basic credentials: 407;
- credentials match only credentialed clients (no fall-through to an anonymous rule);
- a reload is all or nothing (listeners, TLS, admin, access log), and TLS follows it whole;
- identities cached on a keep-alive connection never survive into a new configuration;
- a drain that cuts connections still writes one access record for each.
"""

from __future__ import annotations

import base64
import json
import random
import signal
import socket
import ssl
import time
import urllib.error
import urllib.request

import pytest

from .faulty import read_until_close, rst_close
from .peers import GatewayProcess, base_config, connect, settled_fds

SETTLE = 5.0


def _opener():
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def admin_get(gw: GatewayProcess, path: str) -> tuple[int, bytes]:
    try:
        with _opener().open(gw.admin + path, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def admin_post(gw: GatewayProcess, path: str, token: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(gw.admin + path, method="POST")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with _opener().open(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        body = err.read()
        return err.code, json.loads(body) if body.startswith(b"{") else {"text": body.decode()}


def metric(gw: GatewayProcess, name: str, **labels: str) -> float:
    _, body = admin_get(gw, "/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in key for k, v in labels.items()):
                total += float(value)
    return total


def status_of(raw: bytes) -> int:
    parts = raw.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def serves(gw: GatewayProcess, origin_url: str) -> bool:
    s = connect(gw.address)
    s.sendall(f"GET {origin_url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    raw, how = read_until_close(s)
    s.close()
    return status_of(raw) == 200 and how == "eof"


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def gw(tmp_path_factory, faulty, echo_peer, blackhole):
    cfg = base_config(
        timeouts={"client_head": "2s", "upstream_connect": "2s", "upstream_response": "2s"},
        clients=[{"name": "local", "from": ["127.0.0.1/32"]}],
        security={"connect_ports": [faulty.port, echo_peer.port, blackhole.port]},
    )
    g = GatewayProcess(cfg, tmp_path_factory.mktemp("trust"))
    yield g
    g.kill()


# ------------------------------------------------------------ item 1: descriptors and bugs

def test_reset_right_after_connect_gives_back_its_descriptor(gw, faulty):
    """connect + RST before the gateway asks who the peer is: getpeername fails. It used to
    raise inside connection_made and keep the socket forever (300 resets, ~50 fds held)."""
    assert serves(gw, faulty.url("/ok"))
    baseline = gw.fd_count()
    for _ in range(300):
        s = socket.socket()
        s.connect((gw.host, gw.port))
        rst_close(s)
    assert settled_fds(gw, baseline, SETTLE) <= baseline
    assert serves(gw, faulty.url("/ok"))  # the loop is alive and accepting
    assert metric(gw, "egressgate_internal_errors_total") == 0
    assert not [e for e in gw.events if e.get("event") == "internal_error"]


PHASES = ("before_first_byte", "mid_head", "mid_body", "mid_tunnel", "during_dial")


def _reset_at(phase: str, gw: GatewayProcess, rng: random.Random, faulty, echo_peer, blackhole) -> None:
    s = connect(gw.address)
    if phase == "mid_head":
        head = f"GET {faulty.url('/ok')} HTTP/1.1\r\nHost: x\r\nX-Pad: {'p' * 200}\r\n\r\n".encode()
        s.sendall(head[:rng.randrange(1, len(head) - 1)])
    elif phase == "mid_body":
        s.sendall(f"POST {faulty.url('/sink?t=trust')} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
                  .encode() + b"b" * rng.randrange(1, 200_000))
    elif phase == "mid_tunnel":
        s.sendall(f"CONNECT {echo_peer.address} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.sendall(b"e" * rng.randrange(1, 100_000))
    elif phase == "during_dial":
        s.sendall(f"CONNECT {blackhole.address} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    if phase != "before_first_byte":
        time.sleep(rng.random() * 0.05)  # anywhere in the phase, not only at its start
    rst_close(s)


@pytest.mark.parametrize("phase", PHASES)
def test_resets_at_every_phase_leave_descriptors_at_baseline(gw, faulty, echo_peer, blackhole, phase):
    """Property: whatever the phase and the cut point, a reset leaves nothing behind."""
    assert serves(gw, faulty.url("/ok"))
    # Let connections of earlier cases (a dial still timing out) finish first.
    baseline = gw.fd_count()
    deadline = time.monotonic() + SETTLE
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = gw.fd_count()
        if now == baseline:
            break
        baseline = now
    rng = random.Random(f"trust-{phase}")
    for _ in range(25):
        _reset_at(phase, gw, rng, faulty, echo_peer, blackhole)
    # A dial to the blackhole ends at upstream_connect (2 s); allow for it.
    deadline = time.monotonic() + SETTLE + 2
    while gw.fd_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.fd_count() <= baseline, f"{phase}: {gw.fd_count()} descriptors, baseline {baseline}"
    assert serves(gw, faulty.url("/ok"))
    assert not [e for e in gw.events if e.get("event") == "internal_error"]


# ------------------------------------------------------------ items 4 and 5: request heads

@pytest.mark.parametrize(("host_lines", "detail"), [
    (b"Host: a.example\r\nHost: b.example\r\n", b"more than one Host header field"),
    (b"Host: a.example\r\nhost: a.example\r\n", b"more than one Host header field"),
    (b"Host: a b.example\r\n", b"invalid Host header field"),
    (b"Host: evil.example/path\r\n", b"invalid Host header field"),
    (b"Host: user@evil.example\r\n", b"invalid Host header field"),
])
def test_two_or_invalid_host_fields_get_400_and_close(gw, faulty, host_lines, detail):
    s = connect(gw.address)
    s.sendall(f"GET {faulty.url('/ok?t=host')} HTTP/1.1\r\n".encode() + host_lines + b"\r\n")
    raw, how = read_until_close(s, timeout=5)
    s.close()
    assert status_of(raw) == 400, raw[:300]
    assert b"error=http_request_error" in raw and detail in raw
    assert how == "eof", "the connection stayed open after a 400"
    assert not faulty.requests_to("/ok?t=host"), "the request reached the origin"


@pytest.mark.parametrize("credentials", [b"Basic !!!not-base64", b"Basic " + base64.b64encode(b"no-colon"),
                                         b"Basic " + base64.b64encode(b"\xff\xfe:x")])
def test_malformed_basic_credentials_get_407_with_a_challenge(start_gateway, faulty, credentials):
    cfg = base_config(clients=[{"name": "job", "from": ["127.0.0.0/8"], "username": "job",
                                "password_env": "JOB_SECRET"}])
    gw = start_gateway(cfg, env={"JOB_SECRET": "s3cret"})
    s = connect(gw.address)
    s.sendall(f"GET {faulty.url('/ok')} HTTP/1.1\r\nHost: x\r\n".encode() + b"Proxy-Authorization: " + credentials
              + b"\r\n\r\n")
    raw = s.recv(65536)
    s.close()
    assert status_of(raw) == 407, raw[:300]
    assert b'Proxy-Authenticate: Basic realm="egressgate"' in raw


# ------------------------------------------------------------ item 6: credentials and rules

def test_credentialed_job_never_leaves_through_an_anonymous_rule_listed_first(start_gateway, origin):
    cfg = base_config(
        egress={"default": {"direct": {}}, "vendor-x": {"bind": ["127.0.0.3"]}},
        clients=[{"name": "local", "from": ["127.0.0.0/8"]},
                 {"name": "job-x", "from": ["127.0.0.0/8"], "username": "job-x", "password_env": "JOBX",
                  "egress": ["vendor-x"]}])
    gw = start_gateway(cfg, env={"JOBX": "right"})
    import requests

    def get(user: str, password: str):
        proxy = f"http://{user}:{password}@{gw.address}"
        return requests.get(origin.url("/ip"), proxies={"http": proxy}, timeout=10)

    ok = get("job-x", "right")
    assert ok.status_code == 200
    assert ok.text.strip() == "127.0.0.3"  # job-x's own profile, not local's
    for user, password in (("job-x", "wrong"), ("job-x+vendor-x", "wrong"), ("stranger", "right")):
        r = get(user, password)
        assert r.status_code == 407, (user, password, r.status_code)
        assert r.headers["Proxy-Authenticate"] == 'Basic realm="egressgate"'
    deadline = time.monotonic() + 10  # (the log reader thread may lag under load)
    while len([r for r in gw.log if r.get("status") == 407]) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    recs = [r for r in gw.log if r.get("status") == 407]
    assert len(recs) == 3 and all(r["client"] == "-" for r in recs), recs
    assert [(r["user"], r["reason"]) for r in recs] == [
        ("job-x", "bad_credentials"), ("job-x+vendor-x", "bad_credentials"), ("stranger", "unknown_user")], recs


# ------------------------------------------------------------ items 7 and 10: reloads

def test_reload_to_a_busy_port_keeps_the_old_listener(start_gateway, faulty):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        gw = start_gateway(base_config())
        cfg = base_config()
        # (the listener in force is kept: a config that drops every listener is refused before any bind)
        cfg["listen"] = [{"address": gw.address}, {"address": f"127.0.0.1:{busy.getsockname()[1]}"}]
        cfg["admin"] = {"address": gw.admin.removeprefix("http://")}
        gw.write_config(cfg)
        status, doc = admin_post(gw, "/-/reload")
        assert status == 400 and not doc["reloaded"]
        assert any("listen[1].address: cannot listen on" in e for e in doc["errors"]), doc
        assert serves(gw, faulty.url("/ok")), "the old listener was closed by a failed reload"
        assert admin_get(gw, "/readyz")[0] == 200
    finally:
        busy.close()


def test_reload_applies_admin_token_and_log_format_or_refuses_by_name(start_gateway, faulty, tmp_path):
    gw = start_gateway(base_config())
    cfg = base_config()
    cfg["listen"] = [{"address": gw.address}]
    admin = gw.admin.removeprefix("http://")
    cfg["admin"] = {"address": admin, "token": "t0ken"}
    cfg["log"] = {**cfg["log"], "format": "squid", "access": str(tmp_path / "access.log")}
    gw.write_config(cfg)
    assert admin_post(gw, "/-/reload")[0] == 200  # no token was needed before this reload
    assert admin_post(gw, "/-/reload")[0] == 401  # ... and is now
    assert admin_post(gw, "/-/reload", token="t0ken")[0] == 200
    assert serves(gw, faulty.url("/ok?t=squid"))
    deadline = time.monotonic() + 5
    text = ""
    while "/ok?t=squid" not in text and time.monotonic() < deadline:
        time.sleep(0.05)
        text = (tmp_path / "access.log").read_text() if (tmp_path / "access.log").exists() else ""
    line = next(x for x in text.splitlines() if "/ok?t=squid" in x)
    assert "TCP_MISS/200" in line and not line.startswith("{")  # Squid format, in the new file
    cfg["workers"] = 2
    gw.write_config(cfg)
    status, doc = admin_post(gw, "/-/reload", token="t0ken")
    assert status == 400
    assert doc["errors"] == [f"{gw.config_path}:0: workers: changing it needs a restart "
                             "(the running value stays in force)"]


def _tls_config(tmp_path, name: str, cert, ca_file: str | None = None) -> dict:
    path = tmp_path / f"{name}.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(path))
    tls = {"cert": str(path), "key": str(path)}
    if ca_file:
        tls["client_ca"] = ca_file
    return tls


def _tls_get(gw: GatewayProcess, ca, client_cert=None) -> bytes:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if client_cert is not None:
        client_cert.configure_cert(ctx)
    with socket.create_connection((gw.host, gw.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(b"GET http://egressgate.whoami/ HTTP/1.1\r\nHost: egressgate.whoami\r\nConnection: close\r\n\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_tls_reload_is_all_or_nothing_and_revokes_an_old_client_ca(start_gateway, tmp_path):
    import trustme

    ca_a, ca_b, server_ca = trustme.CA(), trustme.CA(), trustme.CA()
    ca_a_file, ca_b_file = tmp_path / "ca-a.pem", tmp_path / "ca-b.pem"
    ca_a.cert_pem.write_to_path(str(ca_a_file))
    ca_b.cert_pem.write_to_path(str(ca_b_file))
    server = server_ca.issue_cert("127.0.0.1")
    client_a = ca_a.issue_cert("job-a", common_name="job-a")
    client_b = ca_b.issue_cert("job-a", common_name="job-a")
    cfg = base_config(clients=[{"name": "job-a", "cert_subject": "job-a"}])
    cfg["listen"] = [{"address": "127.0.0.1:0", "tls": _tls_config(tmp_path, "server", server, str(ca_a_file))}]
    gw = start_gateway(cfg)
    assert status_of(_tls_get(gw, server_ca, client_a)) == 200
    cfg["listen"] = [{"address": gw.address, "tls": cfg["listen"][0]["tls"]}]
    cfg["admin"] = {"address": gw.admin.removeprefix("http://")}

    # A key that does not match the certificate: refused whole, the old context keeps serving.
    other = server_ca.issue_cert("127.0.0.1")
    mismatched = dict(cfg["listen"][0]["tls"])
    (tmp_path / "other-key.pem").write_bytes(other.private_key_pem.bytes())
    mismatched["key"] = str(tmp_path / "other-key.pem")
    cfg["listen"][0]["tls"] = mismatched
    gw.write_config(cfg)
    status, doc = admin_post(gw, "/-/reload")
    assert status == 400 and any("listen[0].tls" in e for e in doc["errors"]), doc
    assert status_of(_tls_get(gw, server_ca, client_a)) == 200

    # A new client CA replaces the old one: certificates from the old CA stop working.
    cfg["listen"][0]["tls"] = _tls_config(tmp_path, "server", server, str(ca_b_file))
    gw.write_config(cfg)
    assert admin_post(gw, "/-/reload")[0] == 200
    assert status_of(_tls_get(gw, server_ca, client_b)) == 200
    try:
        revoked = _tls_get(gw, server_ca, client_a)
    except (ssl.SSLError, ConnectionError):  # TLS 1.3 may report the refusal on the first read
        revoked = b""
    assert revoked == b"", "a certificate from the replaced CA was accepted"

    # Turning mutual TLS off on a live listener needs a restart: refused by name.
    cfg["listen"][0]["tls"] = {k: v for k, v in cfg["listen"][0]["tls"].items() if k != "client_ca"}
    gw.write_config(cfg)
    status, doc = admin_post(gw, "/-/reload")
    assert status == 400 and any("needs a restart" in e and "listen[0].tls" in e for e in doc["errors"]), doc
    assert status_of(_tls_get(gw, server_ca, client_b)) == 200


def test_identity_from_an_old_config_never_matches_a_new_one(start_gateway, faulty):
    """A keep-alive connection identified under a wide config; after reloads to a config
    that denies the destination, every request on it is judged afresh (403)."""
    wide = base_config(security={"connect_ports": [faulty.port]})
    gw = start_gateway(wide)
    narrow = base_config(clients=[{"name": "local", "from": ["127.0.0.0/8"], "deny": ["127.0.0.1"]}])
    for cfg in (wide, narrow):
        cfg["listen"] = [{"address": gw.address}]
        cfg["admin"] = {"address": gw.admin.removeprefix("http://")}
    s = connect(gw.address)
    try:
        for round_ in range(8):
            gw.write_config(wide)
            assert admin_post(gw, "/-/reload")[0] == 200
            s.sendall(f"GET {faulty.url(f'/ok?r={round_}')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            raw = s.recv(65536)
            assert status_of(raw) == 200, raw[:200]
            # Each reload frees the previous runtime; CPython tends to reuse its address.
            for _ in range(2):
                gw.write_config(narrow)
                assert admin_post(gw, "/-/reload")[0] == 200
            s.sendall(f"GET {faulty.url(f'/ok?r={round_}-denied')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            raw = s.recv(65536)
            assert status_of(raw) == 403, raw[:200]
    finally:
        s.close()


# ------------------------------------------------------------ item 8: drain records

def test_connections_cut_by_drain_each_leave_one_record(start_gateway, faulty, echo_peer):
    cfg = base_config(drain={"grace": 0, "timeout": "500ms"},
                      security={"connect_ports": [echo_peer.port]})
    gw = start_gateway(cfg)
    tunnel = connect(gw.address)
    tunnel.sendall(f"CONNECT {echo_peer.address} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert tunnel.recv(4096).startswith(b"HTTP/1.1 200")
    tunnel.sendall(b"x" * 1000)
    got = 0
    while got < 1000:
        got += len(tunnel.recv(4096))
    download = connect(gw.address)
    download.sendall(f"GET {faulty.url('/stream?t=drain')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert download.recv(65536).startswith(b"HTTP/1.1 200")
    gw.signal(signal.SIGTERM)
    assert gw.wait(20) == 0
    finished = gw.wait_event("drain_finished")
    assert finished["closed_unfinished"] == 2
    cut = [r for r in gw.log if r.get("reason") == "drain_timeout"]
    assert len(cut) == 2, gw.log
    by_method = {r["method"]: r for r in cut}
    assert by_method["CONNECT"]["bytes_up"] == 1000 and by_method["CONNECT"]["bytes_down"] == 1000
    assert by_method["GET"]["status"] == 200 and by_method["GET"]["bytes_down"] > 0
    tunnel.close()
    download.close()


# ------------------------------------------------------------ item 3: fail closed per profile

def _attested_config(origin, **probe) -> dict:
    return base_config(
        egress={"default": {"direct": {}},
                "good": {"bind": ["127.0.0.2"], "expect_ip": ["127.0.0.2"]},
                "bad": {"bind": ["127.0.0.3"], "expect_ip": ["203.0.113.9"]},
                "unbindable": {"bind": ["10.99.99.99"], "expect_ip": ["10.99.99.99"]}},
        clients=[{"name": "job", "from": ["127.0.0.0/8"], "egress": ["good", "bad", "unbindable"]}],
        probe={"echo_url": origin.url("/ip"), "interval": "1h", "retry": "1h", **probe})


def _via(gw: GatewayProcess, profile: str, url: str) -> bytes:
    s = connect(gw.address)
    s.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\nX-Egressgate-Profile: {profile}\r\nConnection: close\r\n\r\n"
              .encode())
    raw, _ = read_until_close(s)
    s.close()
    return raw


def _wait_checked(gw: GatewayProcess, profiles: tuple[str, ...]) -> dict:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        doc = json.loads(admin_get(gw, "/readyz")[1])
        if all(doc["profiles"][p]["observed_ip"] or doc["profiles"][p]["reason"] and "failed" in
               doc["profiles"][p]["reason"] for p in profiles):
            return doc
        time.sleep(0.05)
    raise AssertionError(f"the egress probe never checked {profiles}: {doc}")


def test_a_profile_with_the_wrong_egress_ip_refuses_its_traffic_and_only_its_own(start_gateway, origin):
    gw = start_gateway(_attested_config(origin))
    doc = _wait_checked(gw, ("good", "bad", "unbindable"))
    bad = _via(gw, "bad", origin.url("/ip?t=bad"))
    assert status_of(bad) == 503, bad[:300]
    assert b"Proxy-Status: egressgate; error=destination_unavailable" in bad
    assert b"profile bad: egress IP 127.0.0.3 is not one of [203.0.113.9]" in bad
    unbound = _via(gw, "unbindable", origin.url("/ip?t=unbindable"))
    assert status_of(unbound) == 503 and b"profile unbindable: egress IP not verified" in unbound, unbound[:300]
    good = _via(gw, "good", origin.url("/ip?t=good"))
    assert status_of(good) == 200 and good.endswith(b"127.0.0.2"), good[-200:]
    recs = {p: gw.wait_log(lambda r, p=p: r.get("target", "").endswith(f"/ip?t={p}"))
            for p in ("bad", "unbindable", "good")}
    assert recs["bad"]["reason"] == "egress_ip_mismatch" and recs["bad"]["status"] == 503
    assert recs["unbindable"]["reason"] == "egress_ip_unverified"
    assert recs["good"]["status"] == 200
    # The instance stays in rotation (a profile still serves) and says which profiles refuse.
    status, body = admin_get(gw, "/readyz")
    doc = json.loads(body)
    assert status == 200 and doc["ready"], doc
    assert doc["profiles"]["good"]["ready"] and not doc["profiles"]["bad"]["ready"]
    assert doc["profiles"]["bad"]["observed_ip"] == "127.0.0.3"
    assert metric(gw, "egressgate_egress_profile_serving", profile="bad") == 0
    assert metric(gw, "egressgate_egress_profile_serving", profile="good") == 1


def test_a_profile_moved_to_its_promised_ip_serves_right_after_the_reload(start_gateway, origin):
    cfg = _attested_config(origin)
    gw = start_gateway(cfg)
    _wait_checked(gw, ("bad",))
    assert status_of(_via(gw, "bad", origin.url("/ip"))) == 503
    cfg["egress"]["bad"]["expect_ip"] = ["127.0.0.3"]  # the operator fixes the promise ...
    cfg["listen"] = [{"address": gw.address}]
    cfg["admin"] = {"address": gw.admin.removeprefix("http://")}
    gw.write_config(cfg)
    assert admin_post(gw, "/-/reload")[0] == 200
    fixed = _via(gw, "bad", origin.url("/ip"))  # ... and the very next request leaves from it
    assert status_of(fixed) == 200 and fixed.endswith(b"127.0.0.3"), fixed[-200:]
    cfg["egress"]["good"]["bind"] = ["127.0.0.4"]  # moved to an IP the config does not promise
    gw.write_config(cfg)
    assert admin_post(gw, "/-/reload")[0] == 200
    moved = _via(gw, "good", origin.url("/ip"))
    assert status_of(moved) == 503 and b"egress IP 127.0.0.4 is not one of [127.0.0.2]" in moved, moved[:300]


@pytest.mark.parametrize(("readiness", "ready"), [("any", True), ("all", False)])
def test_readiness_any_or_all_attested_profiles(start_gateway, origin, readiness, ready):
    gw = start_gateway(_attested_config(origin, readiness=readiness))
    _wait_checked(gw, ("good", "bad", "unbindable"))
    status, body = admin_get(gw, "/readyz")
    doc = json.loads(body)
    assert (status == 200) is ready and doc["ready"] is ready, doc
    if not ready:
        assert any("profile bad" in r for r in doc["reasons"]), doc


def test_every_attested_profile_refusing_takes_the_instance_out(start_gateway, origin):
    cfg = _attested_config(origin)
    cfg["egress"].pop("good")
    cfg["clients"][0]["egress"] = ["bad", "unbindable"]
    gw = start_gateway(cfg)
    _wait_checked(gw, ("bad", "unbindable"))
    status, body = admin_get(gw, "/readyz")
    assert status == 503, body
    assert status_of(_via(gw, "default", origin.url("/ip"))) == 403  # (not among job's profiles)
