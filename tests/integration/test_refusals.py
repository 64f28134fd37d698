"""Every refusal: the right status, an RFC 9209 Proxy-Status header, a one-line body, and an
access-log record with the reason."""

from __future__ import annotations

import socket
import time

import pytest

from .peers import base_config, raw_exchange


def _status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


def _header(resp: bytes, name: bytes) -> bytes | None:
    head = resp.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name.lower():
            return v.strip()
    return None


def _body(resp: bytes) -> bytes:
    return resp.split(b"\r\n\r\n", 1)[1]


def _assert_refusal(resp: bytes, status: int, error: str) -> None:
    assert _status(resp) == status, resp[:300]
    ps = _header(resp, b"Proxy-Status")
    assert ps is not None and ps.startswith(b"egressgate; error=" + error.encode()), ps
    body = _body(resp)
    assert body.endswith(b"\n") and body.count(b"\n") == 1 and body.startswith(str(status).encode())


@pytest.fixture
def gw(start_gateway):
    return start_gateway(base_config(timeouts={"client_head": "600ms", "upstream_connect": "700ms"}))


CASES = [
    ("origin_form", b"GET /index.html HTTP/1.1\r\nHost: example.com\r\n\r\n", 400, "http_request_error"),
    ("garbage", b"HELLO THERE\r\n\r\n", 400, "http_request_error"),
    ("bare_lf", b"GET http://127.0.0.1/ HTTP/1.1\nHost: x\n\n", 400, "http_request_error"),
    ("cl_and_te", b"POST http://127.0.0.1:9/ HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "http_request_error"),
    ("two_lengths", b"POST http://127.0.0.1:9/ HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                    b"Content-Length: 6\r\n\r\nhello!", 400, "http_request_error"),
    ("https_absolute", b"GET https://127.0.0.1/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, "http_request_error"),
    ("numeric_host", b"GET http://2130706433/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, "http_request_error"),
    ("connect_no_port", b"CONNECT example.com HTTP/1.1\r\nHost: example.com\r\n\r\n", 400, "http_request_error"),
    ("big_head", b"GET http://127.0.0.1/ HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431,
     "http_request_error"),
    ("private_ip", b"GET http://10.1.2.3/ HTTP/1.1\r\nHost: 10.1.2.3\r\n\r\n", 403, "destination_ip_prohibited"),
    ("metadata_ip", b"GET http://169.254.169.254/computeMetadata/v1/ HTTP/1.1\r\nHost: x\r\n\r\n", 403,
     "destination_ip_prohibited"),
    ("metadata_name", b"GET http://metadata.google.internal/ HTTP/1.1\r\nHost: x\r\n\r\n", 403,
     "destination_ip_prohibited"),
    ("mapped_v6", b"CONNECT [::ffff:10.0.0.1]:443 HTTP/1.1\r\nHost: x\r\n\r\n", 403, "destination_ip_prohibited"),
    ("connect_port", b"CONNECT 127.0.0.1:25 HTTP/1.1\r\nHost: x\r\n\r\n", 403, "http_request_denied"),
]


@pytest.mark.parametrize("name,request_bytes,status,error", CASES, ids=[c[0] for c in CASES])
def test_refusal(gw, name, request_bytes, status, error):
    resp = raw_exchange(gw.address, request_bytes, read_until_close=False)
    _assert_refusal(resp, status, error)
    rec = gw.wait_log(lambda r: r["status"] == status)
    assert rec["reason"]


def test_smuggling_attempt_closes_connection(gw, origin):
    # A valid request followed by a CL+TE one on the same connection: the second is refused
    # and the connection closed, so nothing after it is ever interpreted.
    req = (f"GET {origin.url('/first')} HTTP/1.1\r\nHost: x\r\n\r\n"
           f"POST {origin.url('/upload')} HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
           f"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET {origin.url('/smuggled')} HTTP/1.1\r\n\r\n").encode()
    resp = raw_exchange(gw.address, req)
    assert b"/smuggled" not in resp
    assert b" 400 " in resp


def test_guard_applies_after_dns(start_gateway):
    # No allow_private: 'localhost' resolves to loopback, which is refused after resolution.
    gw = start_gateway(base_config(security={"allow_private": [], "connect_ports": [443]}))
    resp = raw_exchange(gw.address, b"GET http://localhost:1/ HTTP/1.1\r\nHost: localhost\r\n\r\n",
                        read_until_close=False)
    _assert_refusal(resp, 403, "destination_ip_prohibited")
    assert b"localhost resolves to 127.0.0.1" in resp


def test_dns_failure_is_502(gw):
    resp = raw_exchange(gw.address, b"GET http://no-such-host.invalid/ HTTP/1.1\r\nHost: x\r\n\r\n", timeout=15)
    assert _status(resp) in (502, 504)
    assert _header(resp, b"Proxy-Status").split(b";")[1].strip() in (b"error=dns_error", b"error=dns_timeout")


def test_connection_refused_is_502(gw):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    resp = raw_exchange(gw.address, f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    _assert_refusal(resp, 502, "connection_refused")


def test_connect_timeout_is_504(gw):
    # A listener whose accept queue is full drops further SYNs: connects to it hang.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        try:
            f.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(f)
    time.sleep(0.2)
    try:
        resp = raw_exchange(gw.address, f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
                            timeout=10)
        _assert_refusal(resp, 504, "connection_timeout")
    finally:
        for f in fillers:
            f.close()
        lsock.close()


def test_slow_head_gets_408(gw):
    with socket.create_connection((gw.host, gw.port), timeout=5) as s:
        s.sendall(b"GET http://127.0.0.1/ HTTP/1.1\r\nHo")
        t0 = time.monotonic()
        resp = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            resp += chunk
        assert time.monotonic() - t0 < 4
    _assert_refusal(resp, 408, "http_request_error")


def test_silent_connection_gets_408(gw):
    with socket.create_connection((gw.host, gw.port), timeout=5) as s:
        resp = s.recv(4096)
    assert _status(resp) == 408


def test_response_timeout_is_504(start_gateway, origin):
    gw = start_gateway(base_config(timeouts={"upstream_response": "500ms"}))
    resp = raw_exchange(gw.address, f"GET {origin.url('/slow?delay=3')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    _assert_refusal(resp, 504, "http_response_timeout")
