"""Kubernetes service-account tokens as proxy credentials, end to end: a real OIDC issuer on
loopback (discovery + JWKS over HTTPS, ``oidc.Issuer``), keys and tokens minted in the test,
curl and requests through the gateway, CONNECT and plain HTTP."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time

import pytest
import requests

from .conftest import curl
from .oidc import Issuer, new_key
from .peers import ClosedPort, base_config, open_tunnel, raw_exchange, wait_for

SA = "data-jobs/vendor-x-collector"


@pytest.fixture
def issuer(ca):
    i = Issuer(ca)
    yield i
    i.close()


@pytest.fixture(scope="module")
def closed():
    """Loopback ports that refuse: an allowed CONNECT to one ends in a 502 (not a 407), and no
    name is ever looked up."""
    ports = [ClosedPort() for _ in range(4)]
    yield [p.address for p in ports]
    for p in ports:
        p.close()


def k8s_config(issuer: Issuer, ca_file: str, tls_port: int | None = None, closed=(), **kubernetes) -> dict:
    return base_config(
        security={"connect_ports": [443, *(int(a.rsplit(":", 1)[1]) for a in closed)] + ([tls_port] if tls_port else [])},
        egress={"default": {"direct": {}}, "spare": {"direct": {}}},
        clients=[{"name": "vendor-x", "from": ["127.0.0.0/8"], "egress": ["default", "spare"],
                  "kubernetes": {"issuer": issuer.url, "audiences": ["egressgate"], "ca_file": ca_file,
                                 "service_accounts": [SA, "batch/*"], **kubernetes}}])


def started(start_gateway, config: dict):
    gw = start_gateway(config)
    gw.wait_event("jwks_fetched")  # (prefetched at start)
    return gw


def connect(gw, target: str, auth: str | None) -> bytes:
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    if auth:
        head += f"Proxy-Authorization: {auth}\r\n"
    return raw_exchange(gw.address, (head + "\r\n").encode(), read_until_close=False)


def get(url: str, proxy: str | None = None) -> requests.Response:
    with requests.Session() as s:
        s.trust_env = False
        return s.get(url, proxies={"http": proxy} if proxy else None, timeout=10)


def basic(user: str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


def test_valid_token_bearer_and_basic_curl_and_requests(start_gateway, issuer, ca_file, origin, tls_origin):
    gw = started(start_gateway, k8s_config(issuer, ca_file, tls_origin.port))
    token = issuer.mint()
    # curl, CONNECT, Bearer
    r = curl("-x", gw.url, "--proxy-header", f"Proxy-Authorization: Bearer {token}", "--cacert", ca_file,
             tls_origin.url("/bearer", host="localhost"))
    assert r.returncode == 0 and r.stdout == b"hello /bearer\n", r.stderr
    # curl, plain HTTP, Basic k8s:TOKEN in the proxy URL
    r = curl("-x", f"http://k8s:{token}@{gw.address}", origin.url("/basic"))
    assert r.returncode == 0 and r.stdout == b"hello /basic\n", r.stderr
    # requests, both schemes, the profile named in the user (k8s+spare), and an ES256 token
    proxy = f"http://k8s+spare:{issuer.mint('e1', ns='batch', sa='nightly', pod=None)}@{gw.address}"
    with requests.Session() as s:
        s.trust_env = False
        proxies = {"http": proxy, "https": proxy}
        assert s.get(origin.url("/req"), proxies=proxies, timeout=10).text == "hello /req\n"
        assert s.get(tls_origin.url("/reqs", host="localhost"), proxies=proxies, verify=ca_file,
                     timeout=10).text == "hello /reqs\n"
    rec = gw.wait_log(lambda r: r["target"].endswith("/bearer") or r["method"] == "CONNECT")
    assert rec["client"] == SA and rec["pod"] == "collector-7d9f" and rec["status"] == 200
    rec = gw.wait_log(lambda r: r["target"].endswith("/basic"))
    assert rec["client"] == SA and rec["pod"] == "collector-7d9f"
    rec = gw.wait_log(lambda r: r["target"].endswith("/req"))
    assert rec["client"] == "batch/nightly" and rec["profile"] == "spare" and "pod" not in rec
    metrics = get(gw.admin + "/metrics").text
    assert f'client="{SA}"' in metrics  # listed by name: its own series
    assert 'egressgate_jwks_fetches_total{result="ok"} 1.0' in metrics


def test_whoami_shows_the_service_account(start_gateway, issuer, ca_file):
    gw = started(start_gateway, k8s_config(issuer, ca_file))
    r = get("http://egressgate.whoami/", f"http://k8s:{issuer.mint()}@{gw.address}")
    doc = r.json()
    assert doc["client"] == SA
    assert doc["kubernetes"]["entry"] == "vendor-x" and doc["kubernetes"]["pod"] == "collector-7d9f"
    assert doc["kubernetes"]["issuer"] == issuer.url


def test_whoami_and_status_name_the_service_account_and_the_pod(start_gateway, issuer, ca_file, origin):
    """Defect (issue 29 item 2): whoami had no `pod` (the access log's field: the docs named it),
    and /status listed an open token connection under the client entry's name, without the
    service account or the pod."""
    gw = started(start_gateway, k8s_config(issuer, ca_file, origin.port))
    token = issuer.mint()
    doc = get("http://egressgate.whoami/", f"http://k8s:{token}@{gw.address}").json()
    assert (doc["client"], doc["pod"]) == (SA, "collector-7d9f")
    target = f"127.0.0.1:{origin.port}"
    with open_tunnel(gw, target, headers={"Host": target, "Proxy-Authorization": f"Bearer {token}"}):
        status = get(gw.admin + "/status").json()
        rows = [c for c in status["connections"]["open"] if c["target"] == target]
        assert len(rows) == 1, status["connections"]
        assert (rows[0]["client"], rows[0]["pod"], rows[0]["entry"]) == (SA, "collector-7d9f", "vendor-x")


# name -> (how to make the token, reason); each refused with 407 and the reason named
REFUSALS = {
    "expired": (lambda i: i.mint(issued=-700, lifetime=600), "token_expired"),
    "not yet valid": (lambda i: i.mint(issued=300), "token_not_yet_valid"),
    "wrong audience": (lambda i: i.mint(aud=["vault"]), "token_wrong_audience"),
    "wrong issuer": (lambda i: i.mint(iss="https://container.googleapis.com/v1/projects/p/locations/l/clusters/x"),
                     "token_unknown_issuer"),
    "alg none": (lambda i: i.forged("none"), "token_bad_algorithm"),
    "HS256 keyed with the public key": (lambda i: i.forged("HS256"), "token_bad_algorithm"),
    "tampered payload": (lambda i: _tampered(i.mint()), "token_bad_signature"),
    "oversized": (lambda i: "eyJ" + "A" * 20000 + ".e.e", "token_malformed"),
    "garbage": (lambda i: "garbage.garbage.garbage", "token_malformed"),
    "service account not allowed": (lambda i: i.mint(ns="kube-system", sa="default"), "service_account_not_allowed"),
}


def _tampered(token: str) -> str:
    header, payload, sig = token.split(".")
    doc = json.loads(base64.urlsafe_b64decode(payload + "=="))
    doc["kubernetes.io"]["serviceaccount"]["name"] = "admin"
    doc["sub"] = "system:serviceaccount:data-jobs:admin"
    return ".".join((header, base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode(), sig))


def test_every_bad_token_is_a_407_with_its_reason(start_gateway, issuer, ca_file):
    gw = started(start_gateway, k8s_config(issuer, ca_file))
    for n, (name, (make, reason)) in enumerate(REFUSALS.items()):
        token = make(issuer)
        target = f"bad-{n}.example:443"
        answer = connect(gw, target, f"Bearer {token}" if n % 2 else basic("k8s", token))
        head = answer.split(b"\r\n\r\n", 1)[0].decode()
        assert head.startswith("HTTP/1.1 407 "), (name, head)
        assert "Proxy-Status: egressgate; error=http_request_denied; details=" in head, name
        assert 'Proxy-Authenticate: Basic realm="egressgate"' in head
        assert token[:40] not in answer.decode(errors="replace"), name  # nothing of the token comes back
        rec = gw.wait_log(lambda r, t=target: r["target"] == t)
        assert rec["reason"] == reason and rec["status"] == 407, (name, rec)
    rec = gw.wait_log(lambda r: r["reason"] == "service_account_not_allowed")
    assert rec["user"] == "kube-system/default"  # who was refused, in the log only


def test_a_refused_token_is_traced_to_its_job_by_what_it_claims(start_gateway, issuer, ca_file):
    """Defect (issue 29 item 1): records of token_expired, token_wrong_audience,
    token_unknown_issuer, ... carried client "-" and no pod: behind NAT nobody could tell
    which job it was. A well-formed token's claims are logged, marked unverified; the token
    itself never is."""
    gw = started(start_gateway, k8s_config(issuer, ca_file))
    issuer.keys["k9"] = new_key("RSA")  # a key the issuer never publishes
    pod = {"pod": "collector-7d9f", "pod_uid": "9a2e"}
    cases = {
        "token_expired": (issuer.mint(issued=-700, lifetime=600), {"serviceaccount": SA, **pod}),
        "token_wrong_audience": (issuer.mint(aud=["vault"]), {"serviceaccount": SA, **pod}),
        "token_unknown_issuer": (issuer.mint(iss="https://other.example/cluster"),
                                 {"serviceaccount": SA, **pod, "issuer": "https://other.example/cluster"}),
        "token_bad_signature": (_tampered(issuer.mint()), {"serviceaccount": "data-jobs/admin", **pod}),
        "token_unknown_key": (issuer.mint("k9", ns="batch", sa="nightly", pod=None),
                              {"serviceaccount": "batch/nightly"}),
    }
    for n, (reason, (token, claims)) in enumerate(cases.items()):
        target = f"traced-{n}.example:443"
        assert connect(gw, target, f"Bearer {token}").startswith(b"HTTP/1.1 407 ")
        rec = gw.wait_log(lambda r, t=target: r["target"] == t)
        assert rec["reason"] == reason, rec
        assert rec["client_claimed"] == {"issuer": issuer.url, **claims}, (reason, rec)
        assert rec["claims_verified"] is False and rec["client"] == "-"
        assert token.split(".")[1][:20] not in json.dumps(rec) and token[-20:] not in json.dumps(rec)
    assert connect(gw, "garbage.example:443", "Bearer garbage.garbage.garbage").startswith(b"HTTP/1.1 407 ")
    rec = gw.wait_log(lambda r: r["target"] == "garbage.example:443")
    assert rec["reason"] == "token_malformed" and "client_claimed" not in rec  # claims nothing


def test_unknown_kid_then_rotation_is_picked_up(start_gateway, issuer, ca_file, closed):
    gw = started(start_gateway, k8s_config(issuer, ca_file, closed=closed, min_refresh=0))
    fetched = len(issuer.requests)
    issuer.publish("k2")  # the cluster rotated its signing key: k1 is gone, k2 is new
    answer = connect(gw, closed[0], f"Bearer {issuer.mint('k2')}")
    assert answer.startswith(b"HTTP/1.1 502"), answer[:200]  # admitted: the destination refused
    rec = gw.wait_log(lambda r: r["target"] == closed[0])
    assert rec["client"] == SA and rec["reason"] == "connection_refused"
    assert len(issuer.requests) == fetched + 2  # discovery + JWKS, once
    # a key never published: refused, precisely
    issuer.keys["k3"] = issuer.keys["k1"]
    answer = connect(gw, "k3.example:443", f"Bearer {issuer.mint('k3')}")
    assert answer.startswith(b"HTTP/1.1 407 Token Signing Key Unknown")


def test_unknown_kid_refetch_is_rate_limited(start_gateway, issuer, ca_file, closed):
    gw = started(start_gateway, k8s_config(issuer, ca_file, closed=closed, min_refresh="1h"))
    fetched = len(issuer.requests)
    issuer.publish("k1", "k2")
    for n in range(3):
        answer = connect(gw, f"limited-{n}.example:443", f"Bearer {issuer.mint('k2')}")
        assert answer.startswith(b"HTTP/1.1 407 Token Signing Key Unknown"), answer[:200]
    assert len(issuer.requests) == fetched  # the start's fetch was less than min_refresh ago
    answer = connect(gw, closed[0], f"Bearer {issuer.mint('k1')}")
    assert answer.startswith(b"HTTP/1.1 502"), answer[:200]


def test_issuer_outage_keeps_the_cached_keys(start_gateway, issuer, ca_file, closed):
    gw = started(start_gateway, k8s_config(issuer, ca_file, closed=closed, min_refresh=0))
    issuer.close()
    answer = connect(gw, closed[0], f"Bearer {issuer.mint('k1')}")
    assert answer.startswith(b"HTTP/1.1 502"), answer[:200]
    assert gw.wait_log(lambda r: r["target"] == closed[0])["client"] == SA
    issuer.publish("k1", "k2")
    answer = connect(gw, "new-key.example:443", f"Bearer {issuer.mint('k2')}")  # a fetch is tried, and fails
    assert answer.startswith(b"HTTP/1.1 407 Token Signing Key Unknown"), answer[:200]
    failed = gw.wait_event("jwks_fetch_failed")
    assert failed["issuer"] == issuer.url and failed["keeping"] == 2
    answer = connect(gw, closed[1], f"Bearer {issuer.mint('e1')}")  # the kept keys still serve
    assert answer.startswith(b"HTTP/1.1 502"), answer[:200]
    metrics = get(gw.admin + "/metrics").text
    errors = next(ln for ln in metrics.splitlines() if ln.startswith('egressgate_jwks_fetches_total{result="error"}'))
    assert float(errors.split()[-1]) >= 1  # (min_refresh 0: the second look may have tried once more)


def test_issuer_unreachable_from_the_start(start_gateway, issuer, ca_file):
    issuer.close()
    gw = start_gateway(k8s_config(issuer, ca_file))
    gw.wait_event("jwks_fetch_failed")
    answer = connect(gw, "nokeys.example:443", f"Bearer {issuer.mint()}")
    assert answer.startswith(b"HTTP/1.1 407 Token Issuer Keys Unavailable"), answer[:200]


def test_local_jwks_file(start_gateway, issuer, ca_file, tmp_path, closed):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(issuer.jwks()))
    cfg = k8s_config(issuer, ca_file, closed=closed)
    del cfg["clients"][0]["kubernetes"]["ca_file"]
    cfg["clients"][0]["kubernetes"]["jwks_file"] = str(path)
    gw = start_gateway(cfg)
    issuer.close()  # never asked
    assert connect(gw, closed[0], f"Bearer {issuer.mint()}").startswith(b"HTTP/1.1 502")
    assert connect(gw, "none.example:443", None).startswith(b"HTTP/1.1 407 Proxy Authentication Required")


def test_local_jwks_file_is_re_read_when_a_token_names_an_unknown_key(start_gateway, issuer, ca_file, tmp_path,
                                                                        closed):
    """Defect (issue 29 item 10): a rotated key in a local jwks_file needed a manual reload: the
    file is now looked at again when a token names a key it lacks (at most once per min_refresh)."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(issuer.jwks("k1")))
    cfg = k8s_config(issuer, ca_file, closed=closed, min_refresh=0)
    del cfg["clients"][0]["kubernetes"]["ca_file"]
    cfg["clients"][0]["kubernetes"]["jwks_file"] = str(path)
    gw = start_gateway(cfg)
    issuer.publish("k2")
    token = issuer.mint("k2")
    answer = connect(gw, closed[0], f"Bearer {token}")
    assert answer.startswith(b"HTTP/1.1 407"), answer[:200]  # the file does not have k2 yet
    path.write_text(json.dumps(issuer.jwks("k1", "k2")))  # the rotation reaches the file
    answer = connect(gw, closed[1], f"Bearer {token}")
    assert answer.startswith(b"HTTP/1.1 502"), answer[:200]  # admitted, without a reload
    assert gw.wait_log(lambda r: r["target"] == closed[1])["client"] == SA
    gw.wait_event("jwks_file_reread")


def test_check_config_and_explain(issuer, ca_file, tmp_path):
    import yaml

    cfg = k8s_config(issuer, ca_file)
    path = tmp_path / "k8s.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run = [sys.executable, "-m", "egressgate"]
    ok = subprocess.run([*run, "check-config", str(path)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    out = subprocess.run([*run, "explain", "--config", str(path), "--client", SA, "example.com:443"],
                         capture_output=True, text=True, timeout=60)
    assert f"client:      {SA} (kubernetes service account, entry vendor-x" in out.stdout, out.stdout + out.stderr
    cfg["clients"][0]["kubernetes"].update(service_accounts=["Data_Jobs/x"], jwks_file=str(tmp_path / "missing"))
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    bad = subprocess.run([*run, "check-config", str(path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "clients[0].kubernetes.service_accounts" in bad.stdout + bad.stderr


def test_a_connection_does_not_outlive_its_token(start_gateway, issuer, ca_file, origin):
    """The identity a keep-alive connection remembers ends with its token: the next request with
    the same (now expired) credentials is refused."""
    gw = started(start_gateway, k8s_config(issuer, ca_file, leeway=0))
    token = issuer.mint(lifetime=2)
    exp = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))["exp"]
    proxy = f"http://k8s:{token}@{gw.address}"
    with requests.Session() as s:
        s.trust_env = False
        assert s.get(origin.url("/first"), proxies={"http": proxy}, timeout=10).status_code == 200
        wait_for(lambda: time.time() > exp + 0.5, "the token's expiry")
        second = s.get(origin.url("/second"), proxies={"http": proxy}, timeout=10)
    assert second.status_code == 407 and second.reason == "Token Expired"
    first = gw.wait_log(lambda r: r["target"].endswith("/first"))
    rec = gw.wait_log(lambda r: r["target"].endswith("/second"))
    assert rec["reason"] == "token_expired"
    assert rec["client_addr"] == first["client_addr"]  # the same connection (same source port)


def test_reload_adds_a_token_client_and_keeps_the_keys(start_gateway, issuer, ca_file, closed):
    """A reload that brings in a kubernetes entry gets the keys fetched; one that keeps it costs no fetch."""
    cfg = k8s_config(issuer, ca_file, closed=closed)
    token_client = cfg["clients"][0]
    cfg["clients"] = [{"name": "local", "from": ["127.0.0.0/8"]}]
    gw = start_gateway(cfg)
    n = len(gw.events)
    cfg["clients"] = [token_client]
    gw.write_config(cfg)
    gw.signal(signal.SIGHUP)
    gw.wait_event("reloaded", after=n)
    assert connect(gw, closed[0], f"Bearer {issuer.mint()}").startswith(b"HTTP/1.1 502")
    fetched = len(issuer.requests)
    assert fetched == 2  # discovery + JWKS
    n = len(gw.events)
    token_client["egress"] = ["spare", "default"]
    gw.write_config(cfg)
    gw.signal(signal.SIGHUP)
    gw.wait_event("reloaded", after=n)
    assert connect(gw, closed[1], f"Bearer {issuer.mint('e1')}").startswith(b"HTTP/1.1 502")
    assert gw.wait_log(lambda r: r["target"] == closed[1])["profile"] == "spare"
    assert len(issuer.requests) == fetched


def test_socks5_offers_no_authentication_only_when_no_token_is_needed_and_waits_for_the_keys(
        start_gateway, issuer, ca_file):
    """On a socks5 listener a token entry needs credentials (it used to be offered "no
    authentication", then refused); a token whose key must first be fetched is answered only
    once checked (it used to get RFC 1929 success at once)."""
    import socket

    cfg = k8s_config(issuer, ca_file, min_refresh=0)
    cfg["listen"] = [{"address": "127.0.0.1:0", "protocol": "socks5"}]
    gw = started(start_gateway, cfg)
    with socket.create_connection((gw.host, gw.port), timeout=10) as s:
        s.sendall(b"\x05\x02\x00\x02")  # offers "no authentication" and username/password
        assert s.recv(2) == b"\x05\x02"
    # a short token (RFC 1929 allows 255 bytes) signed by a key the issuer never published
    header = base64.urlsafe_b64encode(json.dumps({"alg": "ES256", "kid": "zz"}).encode()).rstrip(b"=")
    # (claims that pass the cheap checks: a token failing those never makes the gateway fetch keys)
    now = int(time.time())
    body = base64.urlsafe_b64encode(json.dumps({"iss": issuer.url, "aud": "egressgate", "exp": now + 600,
                                                "iat": now, "sub": "s"}).encode()).rstrip(b"=")
    token = header + b"." + body + b".c2ln"
    assert len(token) < 256
    fetched = len(issuer.requests)
    with socket.create_connection((gw.host, gw.port), timeout=10) as s:
        s.sendall(b"\x05\x01\x02")
        assert s.recv(2) == b"\x05\x02"
        s.sendall(b"\x01\x03k8s" + bytes([len(token)]) + token)
        assert s.recv(2) == b"\x01\x01"  # failure, after the keys were fetched again
    assert len(issuer.requests) > fetched
    rec = gw.wait_log(lambda r: r["method"] == "SOCKS5" and r["status"] == 407)
    assert rec["reason"] == "token_unknown_key", rec
