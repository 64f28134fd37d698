"""http1/rewrite.py: hop-by-hop removal, Via, Host vs absolute URI, target refusal, response framing."""

from __future__ import annotations

import pytest

from egressgate.errors import ClientProtocolError
from egressgate.http1.parse import RequestHead, RequestParser, ResponseHead, ResponseParser
from egressgate.http1.rewrite import (
    CLIENT_ADDRESS_FIELDS,
    DEFAULT_FORWARDING,
    Forwarding,
    connection_tokens,
    parse_absolute_target,
    request_head_bytes,
    response_framing,
    response_head_bytes,
)

VIA = b"1.1 egressgate"


class _Heads:
    def __init__(self) -> None:
        self.heads: list = []

    def on_request_head(self, head) -> None:
        self.heads.append(head)

    on_response_head = on_request_head

    def on_request_body(self, data) -> None:
        pass

    on_response_body = on_request_body

    def on_request_end(self) -> None:
        pass

    on_response_end = on_request_end


def request(raw: bytes) -> RequestHead:
    sink = _Heads()
    RequestParser(sink).feed(raw)
    return sink.heads[0]


def response(raw: bytes, method: str = "GET") -> ResponseHead:
    sink = _Heads()
    ResponseParser(sink, method).feed(raw)
    return sink.heads[-1]


def lines(head_bytes: bytes) -> list[bytes]:
    assert head_bytes.endswith(b"\r\n\r\n")
    return head_bytes[:-4].split(b"\r\n")


def fields(head_bytes: bytes) -> list[tuple[bytes, bytes]]:
    return [tuple(line.split(b": ", 1)) for line in lines(head_bytes)[1:]]  # type: ignore[misc]


def names(head_bytes: bytes) -> list[bytes]:
    return [name.lower() for name, _ in fields(head_bytes)]


def forward(raw: bytes, fwd: Forwarding = DEFAULT_FORWARDING, **kw) -> bytes:
    head = request(raw)
    return request_head_bytes(head, parse_absolute_target(head.target), fwd, **kw)


# ------------------------------------------------------------------------------ parse_absolute_target

TARGETS = [
    # (target, host, port, origin-form, Host header)
    ("http://example.com/a?b=1", "example.com", 80, b"/a?b=1", b"example.com"),
    ("http://Example.COM./", "example.com", 80, b"/", b"example.com"),
    ("HTTP://example.com/p", "example.com", 80, b"/p", b"example.com"),
    ("http://example.com", "example.com", 80, b"/", b"example.com"),
    ("http://example.com:80/", "example.com", 80, b"/", b"example.com"),
    ("http://example.com:8080/x", "example.com", 8080, b"/x", b"example.com:8080"),
    ("http://example.com:8080", "example.com", 8080, b"/", b"example.com:8080"),
    ("http://[2001:db8::1]/", "2001:db8::1", 80, b"/", b"[2001:db8::1]"),
    ("http://[2001:DB8::1]:8080/x?y", "2001:db8::1", 8080, b"/x?y", b"[2001:db8::1]:8080"),
    ("http://192.0.2.1:81/", "192.0.2.1", 81, b"/", b"192.0.2.1:81"),
    ("http://example.com/p#frag", "example.com", 80, b"/p", b"example.com"),
    ("http://xn--bcher-kva.example/", "xn--bcher-kva.example", 80, b"/", b"xn--bcher-kva.example"),
]


@pytest.mark.parametrize(("target", "host", "port", "origin", "host_header"), TARGETS, ids=[t[0] for t in TARGETS])
def test_parse_absolute_target(target: str, host: str, port: int, origin: bytes, host_header: bytes) -> None:
    t = parse_absolute_target(target)
    assert (t.dest.host, t.dest.port, t.origin_form, t.host_header) == (host, port, origin, host_header)


BAD_TARGETS = [
    ("/path", "origin_form"),
    ("/", "origin_form"),
    ("*", "origin_form"),
    ("https://example.com/", "bad_scheme"),
    ("HTTPS://example.com/", "bad_scheme"),
    ("ftp://example.com/", "bad_scheme"),
    ("example.com:443", "bad_target"),
    ("http://user:pass@example.com/", "bad_target"),
    ("http://example.com:99999/", "bad_target"),
    ("http://127.1/", "bad_host"),
    ("http://2130706433/", "bad_host"),
    ("http://bücher.example/".encode().decode("latin-1"), "bad_target"),  # raw UTF-8 on the wire
]


@pytest.mark.parametrize(("target", "reason"), BAD_TARGETS, ids=[t[0] for t in BAD_TARGETS])
def test_parse_absolute_target_refuses(target: str, reason: str) -> None:
    with pytest.raises(ClientProtocolError) as info:
        parse_absolute_target(target)
    assert info.value.status == 400
    assert info.value.reason == reason


def test_port_zero_is_refused() -> None:
    with pytest.raises(ClientProtocolError):
        parse_absolute_target("http://example.com:0/")


# ------------------------------------------------------------------------------ request_head_bytes

def test_request_line_and_host_come_first() -> None:
    out = forward(b"GET http://example.com:8080/a?b HTTP/1.1\r\nHost: wrong.example\r\nAccept: */*\r\n\r\n")
    assert lines(out)[0] == b"GET /a?b HTTP/1.1"
    assert lines(out)[1] == b"Host: example.com:8080"
    assert names(out).count(b"host") == 1
    assert (b"Accept", b"*/*") in fields(out)


def test_http_1_0_request_goes_out_as_1_1() -> None:
    out = forward(b"GET http://example.com/ HTTP/1.0\r\n\r\n")
    assert lines(out)[0] == b"GET / HTTP/1.1"
    assert lines(out)[1] == b"Host: example.com"


def test_ipv6_host_header() -> None:
    out = forward(b"GET http://[2001:db8::1]:8080/ HTTP/1.1\r\nHost: [2001:db8::1]:8080\r\n\r\n")
    assert lines(out)[1] == b"Host: [2001:db8::1]:8080"
    out = forward(b"GET http://[2001:db8::1]/ HTTP/1.1\r\n\r\n")
    assert lines(out)[1] == b"Host: [2001:db8::1]"


HOP_BY_HOP_REQUEST = (
    b"GET http://example.com/ HTTP/1.1\r\n"
    b"Host: example.com\r\n"
    b"Connection: keep-alive, X-Custom-Hop, Upgrade\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"Proxy-Connection: keep-alive\r\n"
    b"Proxy-Authorization: Basic dTpw\r\n"
    b"Proxy-Authenticate: Basic\r\n"
    b"TE: trailers\r\n"
    b"Trailer: X-T\r\n"
    b"Upgrade: websocket\r\n"
    b"X-Custom-Hop: secret\r\n"
    b"X-Egressgate-Profile: vendor-x\r\n"
    b"X-End-To-End: kept\r\n"
    b"Cookie: a=1\r\n"
    b"\r\n"
)


@pytest.mark.parametrize("name", [b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization",
                                  b"proxy-authenticate", b"te", b"trailer", b"upgrade", b"x-custom-hop",
                                  b"x-egressgate-profile"])
def test_hop_by_hop_request_fields_are_removed(name: bytes) -> None:
    assert name not in names(forward(HOP_BY_HOP_REQUEST))


def test_end_to_end_request_fields_are_kept_in_order() -> None:
    out = forward(HOP_BY_HOP_REQUEST)
    assert names(out) == [b"host", b"x-end-to-end", b"cookie", b"via"]
    assert (b"X-End-To-End", b"kept") in fields(out)


def test_proxy_authorization_is_never_forwarded_but_upstream_credentials_are_added() -> None:
    raw = (b"GET http://example.com/ HTTP/1.1\r\nProxy-Authorization: Basic Y2xpZW50OnNlY3JldA==\r\n"
           b"proxy-authorization: Basic b3RoZXI=\r\n\r\n")
    assert b"Y2xpZW50OnNlY3JldA" not in forward(raw)
    assert b"b3RoZXI" not in forward(raw)
    out = forward(raw, proxy_authorization="Basic dXBzdHJlYW06cHc=", absolute=True)
    assert lines(out)[0] == b"GET http://example.com/ HTTP/1.1"
    assert [v for n, v in fields(out) if n.lower() == b"proxy-authorization"] == [b"Basic dXBzdHJlYW06cHc="]
    assert b"Y2xpZW50OnNlY3JldA" not in out


def test_via_added_and_appended() -> None:
    out = forward(b"GET http://example.com/ HTTP/1.1\r\n\r\n")
    assert [v for n, v in fields(out) if n == b"Via"] == [VIA]
    out = forward(b"GET http://example.com/ HTTP/1.1\r\nVia: 1.0 first, 1.1 second\r\n\r\n")
    assert [v for n, v in fields(out) if n.lower() == b"via"] == [b"1.0 first, 1.1 second, " + VIA]


CLIENT_ADDRESSES = (
    b"GET http://example.com/ HTTP/1.1\r\n"
    b"X-Forwarded-For: 10.8.1.2, 10.0.0.7\r\n"
    b"Forwarded: for=10.8.1.2;by=10.0.0.7\r\n"
    b"X-Real-IP: 10.8.1.2\r\n"
    b"x-forwarded-host: collector.internal\r\n"
    b"True-Client-IP: 10.8.1.2\r\n"
    b"X-Forwarded-Proto: http\r\n"
    b"Accept: */*\r\n\r\n"
)


def test_client_address_fields_are_stripped_by_default() -> None:
    out = forward(CLIENT_ADDRESSES)
    assert not set(names(out)) & CLIENT_ADDRESS_FIELDS, names(out)
    assert b"10.8.1.2" not in out and b"collector.internal" not in out
    assert names(out) == [b"host", b"x-forwarded-proto", b"accept", b"via"]


def test_client_address_fields_kept_when_configured() -> None:
    out = forward(CLIENT_ADDRESSES, Forwarding.compile(via=True, x_forwarded_for="keep"))
    assert names(out) == [b"host", b"x-forwarded-for", b"forwarded", b"x-real-ip", b"x-forwarded-host",
                          b"true-client-ip", b"x-forwarded-proto", b"accept", b"via"]
    assert (b"X-Forwarded-For", b"10.8.1.2, 10.0.0.7") in fields(out)
    # keep never relaxes hop-by-hop removal
    assert b"proxy-authorization" not in names(forward(HOP_BY_HOP_REQUEST, Forwarding.compile(True, "keep")))


def test_compiled_defaults_equal_the_default() -> None:
    assert Forwarding.compile(via=True, x_forwarded_for="strip") == Forwarding()
    assert Forwarding().via == VIA


def test_via_off_adds_no_entry_and_keeps_received_ones() -> None:
    off = Forwarding.compile(via=False, x_forwarded_for="strip")
    assert b"via" not in names(forward(b"GET http://example.com/ HTTP/1.1\r\n\r\n", off))
    out = forward(b"GET http://example.com/ HTTP/1.1\r\nVia: 1.0 first\r\nVia: 1.1 second\r\n\r\n", off)
    assert [v for n, v in fields(out) if n.lower() == b"via"] == [b"1.0 first, 1.1 second"]
    head = response(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert b"via" not in names(response_head_bytes(head, None, "length", keep_alive=True))


def test_several_via_fields_are_all_kept() -> None:
    out = forward(b"GET http://example.com/ HTTP/1.1\r\nVia: 1.0 first\r\nVia: 1.1 second\r\n\r\n")
    assert [v for n, v in fields(out) if n.lower() == b"via"] == [b"1.0 first, 1.1 second, " + VIA]
    head = response(b"HTTP/1.1 200 OK\r\nVia: 1.0 first\r\nVia: 1.1 second\r\nContent-Length: 0\r\n\r\n")
    out = response_head_bytes(head, VIA, "length", keep_alive=True)
    assert [v for n, v in fields(out) if n.lower() == b"via"] == [b"1.0 first, 1.1 second, " + VIA]


FRAMING = [
    (b"POST http://example.com/ HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", [(b"Content-Length", b"3")]),
    (b"POST http://example.com/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     [(b"Transfer-Encoding", b"chunked")]),
    (b"POST http://example.com/ HTTP/1.1\r\ncontent-length: 0\r\n\r\n", [(b"Content-Length", b"0")]),
    (b"GET http://example.com/ HTTP/1.1\r\n\r\n", []),
]


@pytest.mark.parametrize(("raw", "framing"), FRAMING)
def test_request_framing_is_redeclared_once(raw: bytes, framing: list) -> None:
    out = fields(forward(raw))
    assert [f for f in out if f[0].lower() in (b"content-length", b"transfer-encoding")] == framing


# ------------------------------------------------------------------------------ responses

RESPONSE_FRAMING = [
    # (response, request method, client version, framing)
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "GET", "1.1", "length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "GET", "1.0", "length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "GET", "1.1", "chunked"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "GET", "1.0", "close"),
    (b"HTTP/1.1 200 OK\r\n\r\n", "GET", "1.1", "chunked"),  # close-delimited from the origin
    (b"HTTP/1.1 200 OK\r\n\r\n", "GET", "1.0", "close"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "HEAD", "1.1", "none"),
    (b"HTTP/1.1 204 No Content\r\n\r\n", "GET", "1.1", "none"),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", "GET", "1.1", "none"),
    (b"HTTP/1.1 100 Continue\r\n\r\n", "GET", "1.1", "none"),
]


@pytest.mark.parametrize(("raw", "method", "version", "framing"), RESPONSE_FRAMING)
def test_response_framing(raw: bytes, method: str, version: str, framing: str) -> None:
    assert response_framing(response(raw, method), version, method) == framing


def test_response_head_removes_hop_by_hop_and_adds_via() -> None:
    head = response(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\n"
                    b"X-Hop: 1\r\nProxy-Authenticate: Basic\r\nTransfer-Encoding: chunked\r\n"
                    b"Via: 1.1 origin-cdn\r\nServer: test\r\nSet-Cookie: a=1\r\n\r\n")
    out = response_head_bytes(head, VIA, "chunked", keep_alive=True)
    assert lines(out)[0] == b"HTTP/1.1 200 OK"
    assert fields(out) == [(b"Server", b"test"), (b"Set-Cookie", b"a=1"), (b"Via", b"1.1 origin-cdn, " + VIA),
                           (b"Transfer-Encoding", b"chunked"), (b"Connection", b"keep-alive")]


RESPONSE_HEADS = [
    # (response, method, framing, keep_alive, expected framing fields, connection)
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "GET", "length", True,
     [(b"Content-Length", b"5")], b"keep-alive"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "GET", "close", False, [], b"close"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "HEAD", "none", True, [(b"Content-Length", b"5")],
     b"keep-alive"),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", "GET", "none", True, [(b"Content-Length", b"5")],
     b"keep-alive"),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", "GET", "none", True, [], b"keep-alive"),
]


@pytest.mark.parametrize(("raw", "method", "framing", "keep_alive", "framing_fields", "connection"),
                         RESPONSE_HEADS)
def test_response_head_framing_fields(raw, method, framing, keep_alive, framing_fields, connection) -> None:
    out = fields(response_head_bytes(response(raw, method), VIA, framing, keep_alive))
    assert [f for f in out if f[0].lower() in (b"content-length", b"transfer-encoding")] == framing_fields
    assert [v for n, v in out if n == b"Connection"] == [connection]


def test_interim_response_has_no_connection_field() -> None:
    out = response_head_bytes(response(b"HTTP/1.1 100 Continue\r\n\r\n"), VIA, "none", keep_alive=True)
    assert lines(out)[0] == b"HTTP/1.1 100 Continue"
    assert b"connection" not in names(out)


def test_empty_reason_is_replaced() -> None:
    out = response_head_bytes(response(b"HTTP/1.1 404 \r\nContent-Length: 0\r\n\r\n"), VIA, "length", False)
    assert lines(out)[0] == b"HTTP/1.1 404 -"


def test_connection_tokens() -> None:
    headers = [(b"Connection", b"Keep-Alive, X-A"), (b"X-A", b"1"), (b"connection", b" close ,x-b")]
    assert connection_tokens(headers) == frozenset({b"keep-alive", b"x-a", b"close", b"x-b"})
    assert connection_tokens([(b"Host", b"a")]) == frozenset()
