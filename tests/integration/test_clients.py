"""Real clients (curl, requests, httpx, urllib3) through the gateway to loopback origins,
plain HTTP (absolute-URI forwarding) and HTTPS (CONNECT tunnels, TLS verified with a CA made
in the test)."""

from __future__ import annotations

import json
import ssl

import httpx
import requests
import urllib3

from .conftest import curl
from .peers import base_config, pattern_sha256


def _gw(start_gateway, *ports):
    return start_gateway(base_config(security={"connect_ports": [443, *ports]}))


def test_curl_plain_http(start_gateway, origin):
    gw = _gw(start_gateway)
    r = curl("-x", gw.url, origin.url("/hello"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello /hello\n"
    rec = gw.wait_log(lambda r: r["target"].endswith("/hello"))
    assert rec["status"] == 200 and rec["method"] == "GET" and rec["client"] == "local"
    for field in ("ts", "client_addr", "profile", "egress_addr", "upstream_addr", "bytes_up", "bytes_down",
                  "duration_ms", "reason"):
        assert field in rec
    assert rec["upstream_addr"] == "127.0.0.1" and rec["bytes_down"] == len(b"hello /hello\n")


def test_curl_https_through_tunnel(start_gateway, tls_origin, ca_file):
    gw = _gw(start_gateway, tls_origin.port)
    r = curl("-x", gw.url, "--cacert", ca_file, tls_origin.url("/secure", host="localhost"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello /secure\n"
    rec = gw.wait_log(lambda r: r["method"] == "CONNECT")
    assert rec["status"] == 200 and rec["target"] == f"localhost:{tls_origin.port}"
    assert rec["bytes_up"] > 0 and rec["bytes_down"] > 0


def test_curl_proxytunnel_for_plain_http(start_gateway, origin):
    gw = _gw(start_gateway, origin.port)
    r = curl("-p", "-x", gw.url, origin.url("/tunnelled"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello /tunnelled\n"


def test_requests_http_and_https(start_gateway, origin, tls_origin, ca_file):
    gw = _gw(start_gateway, tls_origin.port)
    proxies = {"http": gw.url, "https": gw.url}
    with requests.Session() as s:
        s.trust_env = False
        assert s.get(origin.url("/a"), proxies=proxies, timeout=10).text == "hello /a\n"
        assert s.get(tls_origin.url("/b", host="localhost"), proxies=proxies, verify=ca_file, timeout=10).text == "hello /b\n"
        body = b"x" * 100_000
        r = s.post(origin.url("/upload"), data=body, proxies=proxies, timeout=10)
        assert r.json()["bytes"] == len(body)


def test_httpx_http_and_https(start_gateway, origin, tls_origin, ca_file):
    gw = _gw(start_gateway, tls_origin.port)
    ctx = ssl.create_default_context(cafile=ca_file)
    with httpx.Client(proxy=gw.url, verify=ctx, trust_env=False, timeout=10) as c:
        assert c.get(origin.url("/x")).text == "hello /x\n"
        assert c.get(tls_origin.url("/y", host="localhost")).text == "hello /y\n"
        # keep-alive: several requests on one client connection
        for i in range(5):
            assert c.get(origin.url(f"/k{i}")).text == f"hello /k{i}\n"


def test_urllib3_proxy_manager(start_gateway, origin, tls_origin, ca_file):
    gw = _gw(start_gateway, tls_origin.port)
    pm = urllib3.ProxyManager(gw.url, ca_certs=ca_file)
    r = pm.request("GET", origin.url("/u"))
    assert r.status == 200 and r.data == b"hello /u\n"
    r = pm.request("GET", tls_origin.url("/v", host="localhost"))
    assert r.status == 200 and r.data == b"hello /v\n"


def test_https_proxy_url_form(start_gateway, origin, ca, ca_file, tmp_path):
    """TLS to the proxy itself (the https:// proxy URL form)."""
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    for pem in cert.cert_chain_pems[1:]:
        with open(tmp_path / "tls.crt", "ab") as f:
            f.write(pem.bytes())
    cert.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    cfg = base_config(listen=[{"address": "127.0.0.1:0",
                               "tls": {"cert": str(tmp_path / "tls.crt"), "key": str(tmp_path / "tls.key")}}])
    gw = start_gateway(cfg)
    r = curl("-x", f"https://localhost:{gw.port}", "--proxy-cacert", ca_file, origin.url("/over-tls"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello /over-tls\n"


def test_headers_rewritten(start_gateway, origin):
    cfg = base_config()
    cfg["clients"] = [{"name": "foo", "from": ["127.0.0.0/8"], "username": "foo", "password_env": "FOO_SECRET"}]
    gw = start_gateway(cfg, env={"FOO_SECRET": "bar"})
    r = curl("-x", gw.url, "-H", "Connection: keep-alive, X-Secret-Hop", "-H", "X-Secret-Hop: 1",
             "-H", "Proxy-Authorization: Basic Zm9vOmJhcg==", "-H", "X-Egressgate-Profile: default",
             "-H", "Via: 1.0 upstream-cache", "-H", "TE: trailers", origin.url("/headers?q=1"))
    doc = json.loads(r.stdout)
    names = {k.lower(): v for k, v in doc["headers"]}
    assert doc["request_line"] == "GET /headers?q=1 HTTP/1.1"
    assert names["host"] == f"127.0.0.1:{origin.port}"
    assert names["via"] == "1.0 upstream-cache, 1.1 egressgate"
    for gone in ("x-secret-hop", "proxy-authorization", "x-egressgate-profile", "te", "proxy-connection"):
        assert gone not in names


def test_large_download_and_upload_streamed(start_gateway, origin):
    gw = _gw(start_gateway)
    n = 64 * 1024 * 1024 + 123
    with requests.get(origin.url(f"/bytes?n={n}&mode=chunked"), proxies={"http": gw.url}, stream=True,
                      timeout=30) as r:
        import hashlib

        h = hashlib.sha256()
        for chunk in r.iter_content(1 << 20):
            h.update(chunk)
    assert h.hexdigest() == pattern_sha256(n)

    def gen():
        from .peers import pattern_bytes

        yield from pattern_bytes(n)

    r = requests.post(origin.url("/upload"), data=gen(), proxies={"http": gw.url}, timeout=30)
    assert r.json() == {"bytes": n, "sha256": pattern_sha256(n), "method": "POST"}
