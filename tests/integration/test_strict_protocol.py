"""Strict protocol handling with raw sockets (issue 25, items 8 and 9): lenient request lines
(HTTP/0.9 style, HTTP/2.0, extra spaces), transfer codings the gateway cannot forward intact
(``gzip, chunked``) from a client or from a raw origin, a SOCKS5 request whose reserved byte
is not 0, and an IPv4-translated IPv6 literal (``::ffff:0:a.b.c.d``) of a refused address.
Every refusal: its status and Proxy-Status, an access-log reason, and nothing sent on."""

from __future__ import annotations

import socket

import pytest

from .faulty import FaultyServer, Peer, Response, read_until_close
from .peers import Tripwire, base_config, connect, first_kept_alive, raw_exchange


@pytest.fixture
def tripwire():
    t = Tripwire("127.0.0.1")
    yield t
    t.close()


@pytest.fixture
def gw(start_gateway, tripwire):
    return start_gateway(base_config(security={"connect_ports": [tripwire.port]}))


# (request, status, reason): {url} and {address} name the destination, a tripwire
LENIENT = [
    pytest.param("GET {url}\r\n\r\n", 400, "bad_request_line", id="http-0.9-style"),
    pytest.param("GET {url} HTTP/2.0\r\nHost: {address}\r\n\r\n", 505, "http_version_not_supported", id="http-2.0"),
    pytest.param("GET  {url} HTTP/1.1\r\nHost: {address}\r\n\r\n", 400, "bad_request_line", id="double-space"),
    pytest.param("GET {url}  HTTP/1.1\r\nHost: {address}\r\n\r\n", 400, "bad_request_line",
                 id="double-space-before-version"),
    pytest.param("CONNECT  {address} HTTP/1.1\r\nHost: {address}\r\n\r\n", 400, "bad_request_line",
                 id="connect-double-space"),
    pytest.param("CONNECT {address} HTTP/2.0\r\nHost: {address}\r\n\r\n", 505, "http_version_not_supported",
                 id="connect-http-2.0"),
    pytest.param("POST {url} HTTP/1.1\r\nHost: {address}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                 "3\r\nabc\r\n0\r\n\r\n", 501, "unsupported_transfer_coding", id="te-gzip-chunked"),
]


@pytest.mark.parametrize(("template", "status", "reason"), LENIENT)
def test_lenient_requests_are_refused_and_nothing_is_sent_on(gw, tripwire, template, status, reason):
    """Each request, sent raw, is refused with its status and reason (the Proxy-Status names
    a request error); the destination (a tripwire) is never contacted."""
    wire = template.format(url=f"http://{tripwire.address}/x?q=1", address=tripwire.address)
    resp = Response(raw_exchange(gw.address, wire.encode(), timeout=10))
    assert resp.status == status, resp
    assert resp.proxy_status_error == "http_request_error", resp
    rec = gw.wait_log(lambda r: r.get("reason") == reason)
    assert rec["status"] == status
    assert tripwire.touched() == [], "the gateway forwarded a request it should have refused"


def test_double_space_on_a_kept_alive_connection(gw, origin):
    """The first request is answered and the connection kept alive; the second, with two
    spaces after its method, is refused (400) and the connection closed."""
    with connect(gw.address, timeout=10) as s:
        first_kept_alive(s, origin)
        s.sendall(f"GET  {origin.url('/second')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data, how = read_until_close(s, 10)
    assert how in ("eof", "reset"), how
    second = Response(data)
    assert second.status == 400 and second.proxy_status_error == "http_request_error", second


def _gzip_chunked_origin(p: Peer) -> str:
    p.read_head()
    p.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: gzip, chunked\r\n"
           b"Connection: close\r\n\r\n5\r\nHELLO\r\n0\r\n\r\n")
    p.sock.close()
    return "self"


def test_origin_transfer_coding_other_than_chunked_is_502(gw):
    """A raw origin answers ``Transfer-Encoding: gzip, chunked``: forwarded as chunked alone
    the body would lose its coding, so the client gets 502 with a Proxy-Status reason and not
    a byte of the origin's head or body."""
    origin = FaultyServer(_gzip_chunked_origin)
    try:
        with connect(gw.address, timeout=10) as s:
            s.sendall(f"GET {origin.url('/coded')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data, _ = read_until_close(s, 10)
        resp = Response(data)
        assert resp.status == 502, resp
        assert resp.proxy_status_error == "http_protocol_error", resp
        assert b"HELLO" not in data and b"gzip" not in data.split(b"\r\n\r\n", 1)[0].lower().replace(
            b"gzip, chunked", b""), resp
        rec = gw.wait_log(lambda r: r.get("reason") == "unsupported_transfer_coding")
        assert rec["status"] == 502
        assert len(origin.peers) == 1
    finally:
        origin.close()


def test_socks5_reserved_byte_not_zero_is_refused(start_gateway, tripwire):
    """RFC 1928: RSV is X'00'. A request with RSV 1 gets a general-failure reply and the
    connection is closed; the destination is never contacted."""
    gw = start_gateway(base_config(listen=[{"address": "127.0.0.1:0", "protocol": "socks5"}],
                                   security={"connect_ports": [tripwire.port]}))
    with socket.create_connection((gw.host, gw.port), timeout=10) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x01\x01" + socket.inet_aton("127.0.0.1") + tripwire.port.to_bytes(2, "big"))
        data, how = read_until_close(s, 10)
    assert how in ("eof", "reset"), how
    assert data[:2] == b"\x05\x01", data  # general SOCKS server failure
    rec = gw.wait_log(lambda r: r.get("reason") == "socks_reserved")
    assert rec["client_addr"]
    assert tripwire.touched() == []


@pytest.mark.parametrize("literal", ["::ffff:0:7f00:1", "::ffff:0:a9fe:a9fe", "::ffff:0:a00:1"],
                         ids=["translated-loopback", "translated-metadata", "translated-private"])
def test_ipv4_translated_literal_is_judged_as_its_ipv4(start_gateway, literal):
    """``::ffff:0:127.0.0.1`` (IPv4-translated, RFC 2765/6145) is 127.0.0.1 to a stateless
    translator: refused by the address guard (403 destination_ip_prohibited), as the IPv4
    form is, not dialed."""
    gw = start_gateway(base_config(security={"allow_private": [], "connect_ports": [443]}))
    resp = Response(raw_exchange(gw.address, f"CONNECT [{literal}]:443 HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
                                 read_until_close=False))
    assert resp.status == 403, resp
    assert resp.proxy_status_error == "destination_ip_prohibited", resp
    resp = Response(raw_exchange(gw.address, f"GET http://[{literal}]/ HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
                                 read_until_close=False))
    assert resp.status == 403, resp
