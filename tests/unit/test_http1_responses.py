"""http1/responses.py: error responses with RFC 9209 Proxy-Status, 407 challenge, one-line body."""

from __future__ import annotations

import re

import pytest

from egressgate import errors
from egressgate.http1.parse import ResponseParser
from egressgate.http1.responses import CONNECT_OK, error_response, simple_response


class _Sink:
    def __init__(self) -> None:
        self.head = None
        self.body = b""
        self.ended = False

    def on_response_head(self, head) -> None:
        self.head = head

    def on_response_body(self, data: bytes) -> None:
        self.body += data

    def on_response_end(self) -> None:
        self.ended = True


def parse(raw: bytes) -> _Sink:
    sink = _Sink()
    ResponseParser(sink, "GET").feed(raw)
    assert sink.ended, "the response must be complete and self-delimited"
    return sink


def header(sink: _Sink, name: bytes) -> list[bytes]:
    return [v for n, v in sink.head.headers if n.lower() == name]


# sf-token / sf-string per RFC 8941, as RFC 9209 uses them
PROXY_STATUS = re.compile(rb'^egressgate; error=[a-z][a-z0-9_]*; details="(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*"$')

ERRORS = [
    # (error, status, Proxy-Status error type)
    (errors.ClientProtocolError("bad"), 400, "http_request_error"),
    (errors.HeadTooLarge("big"), 431, "http_request_error"),
    (errors.ClientTimeout("slow"), 408, "http_request_error"),
    (errors.AuthRequired("who?"), 407, "http_request_denied"),
    (errors.PolicyDenied("no"), 403, "http_request_denied"),
    (errors.AddressProhibited("10.0.0.1 is private"), 403, "destination_ip_prohibited"),
    (errors.LimitReached("full"), 429, "connection_limit_reached"),
    (errors.Unavailable("draining"), 503, "proxy_internal_response"),
    (errors.UpstreamError("reset"), 502, "proxy_internal_error"),
    (errors.DnsError("nxdomain"), 502, "dns_error"),
    (errors.ConnectRefused("refused"), 502, "connection_refused"),
    (errors.UpstreamProtocolError("junk"), 502, "http_protocol_error"),
    (errors.UpstreamTimeout("slow"), 504, "connection_timeout"),
    (errors.GatewayError("oops"), 500, "proxy_internal_error"),
    (errors.PolicyDenied("x", status=451, proxy_status="destination_not_found"), 451, "destination_not_found"),
]


@pytest.mark.parametrize(("err", "status", "proxy_status"), ERRORS, ids=[type(e[0]).__name__ for e in ERRORS])
def test_error_response(err: errors.GatewayError, status: int, proxy_status: str) -> None:
    raw = error_response(err)
    sink = parse(raw)
    assert sink.head.status == status
    values = header(sink, b"proxy-status")
    assert len(values) == 1
    assert PROXY_STATUS.match(values[0]), values[0]
    assert values[0].startswith(f"egressgate; error={proxy_status}; ".encode())
    assert header(sink, b"content-type") == [b"text/plain; charset=utf-8"]
    assert header(sink, b"connection") == [b"close"]
    assert sink.body.endswith(b"\n") and sink.body.count(b"\n") == 1
    assert sink.body.startswith(f"{status} ".encode())
    assert err.detail.encode() in sink.body
    challenge = header(sink, b"proxy-authenticate")
    if status == 407:
        assert challenge == [b'Basic realm="egressgate"']
    else:
        assert challenge == []


@pytest.mark.parametrize("detail", [
    'quote " and backslash \\ here',
    "two\nlines\r\nand a tab\t",
    "non-ascii: bücher ☃",
    "header injection\r\nSet-Cookie: x=1",
])
def test_details_are_escaped_and_the_body_stays_one_line(detail: str) -> None:
    raw = error_response(errors.PolicyDenied(detail))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert body.count(b"\n") == 1 and body.endswith(b"\n")
    assert b"\r" not in body
    assert not any(line.lower().startswith(b"set-cookie") for line in head.split(b"\r\n"))
    sink = parse(raw)
    (value,) = header(sink, b"proxy-status")
    assert PROXY_STATUS.match(value), value
    assert len(sink.body) == int(header(sink, b"content-length")[0])


def test_quoted_details_round_trip() -> None:
    sink = parse(error_response(errors.PolicyDenied('say "hi" \\o/')))
    (value,) = header(sink, b"proxy-status")
    assert value.endswith(b'details="say \\"hi\\" \\\\o/"')


def test_keep_alive_error_response() -> None:
    sink = parse(error_response(errors.AuthRequired("creds"), keep_alive=True))
    assert header(sink, b"connection") == [b"keep-alive"]
    assert sink.head.keep_alive


def test_status_line_phrases() -> None:
    assert error_response(errors.AuthRequired("x")).startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
    assert error_response(errors.PolicyDenied("x")).startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert error_response(errors.GatewayError("x", status=599)).startswith(b"HTTP/1.1 599 Error\r\n")


def test_simple_response() -> None:
    raw = simple_response(200, b'{"ok":true}', extra=(("X-A", "1"),))
    sink = parse(raw)
    assert sink.head.status == 200
    assert sink.body == b'{"ok":true}'
    assert header(sink, b"content-type") == [b"application/json"]
    assert header(sink, b"cache-control") == [b"no-store"]
    assert header(sink, b"x-a") == [b"1"]


def test_connect_ok() -> None:
    assert CONNECT_OK == b"HTTP/1.1 200 Connection established\r\n\r\n"
