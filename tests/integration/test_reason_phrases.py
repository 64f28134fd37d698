"""Jobs see why: the status line of every refusal names its reason, as real clients show it.

For HTTPS a client sees only the status line of a failed CONNECT (Python requests puts it in
its ``ProxyError``; curl prints it with ``-v``), so the reason phrase is all a job's log holds.
``CONNECT egressgate.whoami:443`` (an HTTPS-only job's pre-flight) is refused with a phrase
and body that say to use ``http://egressgate.whoami/``, which works through the same proxy URL.
"""

from __future__ import annotations

import base64
import json
import socket

import pytest
import requests

from .conftest import curl
from .peers import ClosedPort, base_config, raw_exchange, read_head

SECRET = "s3cret-for-phrases"


@pytest.fixture
def closed():
    with ClosedPort() as port:  # bound, never listening: connects to it are refused
        yield port


@pytest.fixture
def gw(start_gateway, closed):
    """Three clients on loopback: ``picky`` (anonymous, one allowed destination), ``open``
    (credentials, any public destination) and ``limited`` (credentials, one connection)."""
    cfg = base_config(security={"allow_private": ["127.0.0.0/8"], "connect_ports": [443, closed.port]})
    cfg["clients"] = [
        {"name": "picky", "from": ["127.0.0.0/8"], "allow": ["allowed.example"]},
        {"name": "open", "from": ["127.0.0.0/8"], "username": "open", "password_env": "PHRASE_SECRET"},
        {"name": "limited", "from": ["127.0.0.0/8"], "username": "limited", "password_env": "PHRASE_SECRET",
         "max_connections": 1},
    ]
    return start_gateway(cfg, env={"PHRASE_SECRET": SECRET})


def _proxy(gw, user: str | None = None, password: str = SECRET) -> str:
    return f"http://{user}:{password}@{gw.address}" if user else gw.url


def _requests_connect_error(proxy: str, url: str) -> str:
    """What requests tells a job whose CONNECT was refused."""
    with pytest.raises(requests.exceptions.ProxyError) as info:
        requests.get(url, proxies={"https": proxy}, timeout=10)
    return str(info.value)


CONNECT_CASES = [
    # (id, proxy user, https URL, status line the job must see)
    ("destination_not_allowed", None, "https://127.0.0.1:443/", "403 Destination Not Allowed"),
    ("connect_port_not_allowed", None, "https://127.0.0.1:8443/", "403 Connect Port Not Allowed"),
    ("destination_ip_prohibited", "open", "https://10.1.2.3:443/", "403 Destination IP Prohibited"),
    ("auth_required", "-", "https://127.0.0.1:443/", "407 Proxy Credentials Rejected"),
]


@pytest.mark.parametrize(("user", "url", "line"), [c[1:] for c in CONNECT_CASES], ids=[c[0] for c in CONNECT_CASES])
def test_requests_shows_the_reason_of_a_refused_connect(gw, user, url, line):
    proxy = _proxy(gw, "open", "wrong-password") if user == "-" else _proxy(gw, user)
    message = _requests_connect_error(proxy, url)
    assert line in message, message


def test_requests_shows_bad_gateway_reasons(gw, closed):
    message = _requests_connect_error(_proxy(gw, "open"), f"https://127.0.0.1:{closed.port}/")
    assert "502 Destination Refused Connection" in message, message


def test_requests_shows_client_limit_reached(gw):
    token = base64.b64encode(f"limited:{SECRET}".encode()).decode()
    with socket.create_connection((gw.host, gw.port), timeout=10) as held:
        # one keep-alive request identifies the connection as "limited" and it stays open
        held.sendall(f"GET http://egressgate.whoami/ HTTP/1.1\r\nHost: egressgate.whoami\r\n"
                     f"Proxy-Authorization: Basic {token}\r\n\r\n".encode())
        answer = read_head(held)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        message = _requests_connect_error(_proxy(gw, "limited"), "https://127.0.0.1:443/")
    assert "429 Client Limit Reached" in message, message


def test_curl_shows_the_reason_of_a_refused_connect(gw):
    r = curl("-v", "-x", gw.url, "https://127.0.0.1:8443/")
    assert r.returncode != 0
    assert b"< HTTP/1.1 403 Connect Port Not Allowed" in r.stderr, r.stderr[-2000:]


def test_curl_shows_the_reason_of_a_refused_plain_request(gw):
    r = curl("-i", "-x", gw.url, "http://127.0.0.1/")
    status_line, _, rest = r.stdout.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 403 Destination Not Allowed", r.stdout[:300]
    assert b"Proxy-Status: egressgate; error=http_request_denied; " in rest
    assert rest.endswith(b"\r\n\r\n403 Destination Not Allowed: destination_not_allowed: 127.0.0.1:80 for client "
                         b"picky (allow)\n"), rest[-300:]


def test_connect_to_whoami_says_to_use_plain_http(gw):
    resp = raw_exchange(gw.address, b"CONNECT egressgate.whoami:443 HTTP/1.1\r\nHost: egressgate.whoami:443\r\n\r\n")
    head, _, body = resp.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Use http://egressgate.whoami/\r\n"), head
    assert b"Proxy-Status: egressgate; error=http_request_error; " in head
    assert body.startswith(b"400 Use http://egressgate.whoami/: ") and body.count(b"\n") == 1, body
    assert b"use http://egressgate.whoami/" in body
    rec = gw.wait_log(lambda r: r.get("reason") == "whoami_over_connect")
    assert rec["status"] == 400 and rec["method"] == "CONNECT"


def test_requests_https_whoami_says_to_use_plain_http(gw):
    message = _requests_connect_error(gw.url, "https://egressgate.whoami/")
    assert "400 Use http://egressgate.whoami/" in message, message


def test_preflight_with_only_https_proxy(gw):
    """The README's pre-flight for a job that sets only HTTPS_PROXY: the same proxy URL, used
    for one plain-HTTP request (curl -x, requests with an "http" proxy)."""
    https_proxy = _proxy(gw, "open")
    r = curl("-x", https_proxy, "http://egressgate.whoami/")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["client"] == "open"
    doc = requests.get("http://egressgate.whoami/", proxies={"http": https_proxy}, timeout=10).json()
    assert doc["client"] == "open" and doc["profile"] == "default"
