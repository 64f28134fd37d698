"""Every refusal: the right status, an RFC 9209 Proxy-Status header, a one-line body, and an
access-log record with the reason."""

from __future__ import annotations

import pytest

from .dnsserver import DnsServer
from .faulty import Blackhole, read_until_close
from .peers import ClosedPort, base_config, connect, first_kept_alive, raw_exchange


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
    # A valid request answered on a keep-alive connection, then a CL+TE one followed by a
    # smuggled request: the second is refused and the connection closed within a bound, so
    # nothing after it is ever interpreted.
    with connect(gw.address, timeout=10) as s:
        first_kept_alive(s, origin)
        s.sendall(f"POST {origin.url('/upload')} HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                  f"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET {origin.url('/smuggled')} HTTP/1.1\r\n\r\n"
                  .encode())
        resp, how = read_until_close(s, 10)
    assert how in ("eof", "reset"), f"the gateway kept the connection open after the refusal ({how})"
    _assert_refusal(resp, 400, "http_request_error")
    assert b"/smuggled" not in resp


def test_guard_applies_after_dns(start_gateway):
    # No allow_private: 'localhost' resolves to loopback, which is refused after resolution.
    gw = start_gateway(base_config(security={"allow_private": [], "connect_ports": [443]}))
    resp = raw_exchange(gw.address, b"GET http://localhost:1/ HTTP/1.1\r\nHost: localhost\r\n\r\n",
                        read_until_close=False)
    _assert_refusal(resp, 403, "destination_ip_prohibited")
    assert b"localhost resolves to 127.0.0.1" in resp


def test_dns_failure_is_502(start_gateway):
    # A name server that answers: the name does not exist. Exactly 502 dns_error.
    with DnsServer({}) as dns:
        gw = start_gateway(base_config(dns={"servers": [dns.address]}))
        resp = raw_exchange(gw.address, b"GET http://no-such-host.test/ HTTP/1.1\r\nHost: x\r\n\r\n", timeout=15)
        assert "no-such-host.test" in dns.queries
    _assert_refusal(resp, 502, "dns_error")
    assert gw.wait_log(lambda r: r["target"] == "http://no-such-host.test/")["status"] == 502


def test_dns_timeout_is_504(start_gateway):
    # A name server that never answers: exactly 504 dns_timeout once timeouts.dns has passed.
    with DnsServer({}, silent=True) as dns:
        gw = start_gateway(base_config(dns={"servers": [dns.address]}, timeouts={"dns": "500ms"}))
        resp = raw_exchange(gw.address, b"GET http://slow-dns.test/ HTTP/1.1\r\nHost: x\r\n\r\n", timeout=15)
        assert "slow-dns.test" in dns.queries
    _assert_refusal(resp, 504, "dns_timeout")


def test_connection_refused_is_502(gw):
    with ClosedPort() as closed:  # bound, never listening: connects to it are refused
        resp = raw_exchange(gw.address, f"GET http://{closed.address}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    _assert_refusal(resp, 502, "connection_refused")


def test_connect_timeout_is_504(gw):
    hole = Blackhole()  # a listener whose accept queue is full drops further SYNs: connects hang
    try:
        resp = raw_exchange(gw.address, f"GET http://{hole.address}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
                            timeout=10)
        _assert_refusal(resp, 504, "connection_timeout")
    finally:
        hole.close()


def test_slow_head_gets_408(gw):
    # half a head, then nothing: the gateway answers 408 and closes (within the read bound)
    resp = raw_exchange(gw.address, b"GET http://127.0.0.1/ HTTP/1.1\r\nHo", timeout=10)
    _assert_refusal(resp, 408, "http_request_error")


def test_silent_connection_gets_408(gw):
    resp = raw_exchange(gw.address, b"", timeout=10)
    _assert_refusal(resp, 408, "http_request_error")


def test_response_timeout_is_504(start_gateway, origin):
    gw = start_gateway(base_config(timeouts={"upstream_response": "500ms"}))
    resp = raw_exchange(gw.address, f"GET {origin.url('/slow?delay=3')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    _assert_refusal(resp, 504, "http_response_timeout")
