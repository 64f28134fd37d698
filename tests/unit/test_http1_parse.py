"""http1/parse.py: RequestParser and ResponseParser driven with a recording sink (no sockets)."""

from __future__ import annotations

import pytest

from egressgate.errors import ClientProtocolError, HeadTooLarge, UpstreamProtocolError
from egressgate.http1.parse import RequestHead, RequestParser, ResponseHead, ResponseParser


class Recorder:
    """A sink for both parsers: records events as plain tuples (body chunks coalesced later)."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.heads: list[RequestHead | ResponseHead] = []

    def on_request_head(self, head: RequestHead) -> None:
        self.heads.append(head)
        self.events.append(("head", head.method, head.target, head.version, head.keep_alive,
                            head.content_length, head.chunked, tuple(head.headers)))

    def on_request_body(self, data: bytes) -> None:
        self.events.append(("body", bytes(data)))

    def on_request_end(self) -> None:
        self.events.append(("end",))

    def on_response_head(self, head: ResponseHead) -> None:
        self.heads.append(head)
        self.events.append(("head", head.status, head.reason, head.version, head.keep_alive,
                            head.content_length, head.chunked, head.until_close, tuple(head.headers)))

    on_response_body = on_request_body
    on_response_end = on_request_end


def coalesce(events: list[tuple]) -> list[tuple]:
    """Join adjacent body events: how a body is split across callbacks depends on the feeds."""
    out: list[tuple] = []
    for ev in events:
        if ev[0] == "body" and out and out[-1][0] == "body":
            out[-1] = ("body", out[-1][1] + ev[1])
        else:
            out.append(ev)
    return out


def feed_requests(data: bytes, *, bytewise: bool = False, **limits) -> tuple[list[tuple], bytes | None]:
    """Feed ``data`` at once or one byte at a time; after a CONNECT head nothing more is fed and
    the unfed bytes are appended to what ``feed`` returned (the start of the tunnel)."""
    rec = Recorder()
    parser = RequestParser(rec, **limits)
    step = 1 if bytewise else max(len(data), 1)
    for i in range(0, len(data), step):
        leftover = parser.feed(data[i:i + step])
        if leftover is not None:
            return coalesce(rec.events), leftover + data[i + step:]
    return coalesce(rec.events), None


# ------------------------------------------------------------------------------ requests

GET_A = b"GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n"
GET_B = b"GET http://b.example/y?q=1 HTTP/1.1\r\nHost: b.example\r\nAccept: */*\r\n\r\n"
HEAD_A = ("head", "GET", "http://a.example/x", "1.1", True, None, False, ((b"Host", b"a.example"),))
HEAD_B = ("head", "GET", "http://b.example/y?q=1", "1.1", True, None, False,
          ((b"Host", b"b.example"), (b"Accept", b"*/*")))

REQUESTS = [
    pytest.param(GET_A, [HEAD_A, ("end",)], None, id="one-get"),
    pytest.param(GET_A + GET_B, [HEAD_A, ("end",), HEAD_B, ("end",)], None, id="pipelined-in-one-feed"),
    pytest.param(
        b"GET http://a.example/ HTTP/1.0\r\n\r\n",
        [("head", "GET", "http://a.example/", "1.0", False, None, False, ()), ("end",)], None, id="http-1.0"),
    pytest.param(
        b"GET http://a.example/ HTTP/1.0\r\n\r\n" + GET_B,
        [("head", "GET", "http://a.example/", "1.0", False, None, False, ()), ("end",)], None,
        id="http-1.0-closes-rest-ignored"),
    pytest.param(
        b"GET http://a.example/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + GET_B,
        [("head", "GET", "http://a.example/", "1.0", True, None, False, ((b"Connection", b"keep-alive"),)),
         ("end",), HEAD_B, ("end",)], None, id="http-1.0-keep-alive"),
    pytest.param(
        b"GET http://a.example/ HTTP/1.1\r\nConnection: close\r\n\r\n" + GET_B,
        [("head", "GET", "http://a.example/", "1.1", False, None, False, ((b"Connection", b"close"),)),
         ("end",)], None, id="connection-close-rest-ignored"),
    pytest.param(
        b"POST http://a.example/ HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello" + GET_B,
        [("head", "POST", "http://a.example/", "1.1", True, 5, False, ((b"Content-Length", b"5"),)),
         ("body", b"hello"), ("end",), HEAD_B, ("end",)], None, id="content-length-body-then-next"),
    pytest.param(
        b"POST http://a.example/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer-X: 1\r\n\r\n" + GET_A,
        [("head", "POST", "http://a.example/", "1.1", True, None, True, ((b"Transfer-Encoding", b"chunked"),)),
         ("body", b"hello world"), ("end",), HEAD_A, ("end",)], None, id="chunked-body"),
    pytest.param(
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n\x16\x03\x01\x00\x05",
        [("head", "CONNECT", "a.example:443", "1.1", True, None, False, ((b"Host", b"a.example:443"),))],
        b"\x16\x03\x01\x00\x05", id="connect-with-leftover"),
    pytest.param(
        b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\n\r\n",
        [("head", "CONNECT", "[2001:db8::1]:443", "1.1", True, None, False, ())], b"",
        id="connect-no-leftover"),
    pytest.param(
        GET_A + b"CONNECT a.example:443 HTTP/1.1\r\n\r\nGET not-http",
        [HEAD_A, ("end",), ("head", "CONNECT", "a.example:443", "1.1", True, None, False, ())], b"GET not-http",
        id="get-then-connect"),
    pytest.param(
        b"GET http://a.example/ HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n" + GET_B,
        [("head", "GET", "http://a.example/", "1.1", True, None, False,
          ((b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"))), ("end",), HEAD_B, ("end",)], None,
        id="upgrade-forwarded-as-plain-request"),
]


@pytest.mark.parametrize(("data", "events", "leftover"), REQUESTS)
def test_request_events(data: bytes, events: list[tuple], leftover: bytes | None) -> None:
    got, rest = feed_requests(data)
    assert got == events
    assert rest == leftover


@pytest.mark.parametrize(("data", "events", "leftover"), REQUESTS)
def test_request_events_fed_byte_by_byte_are_the_same(data: bytes, events: list[tuple],
                                                      leftover: bytes | None) -> None:
    got, rest = feed_requests(data, bytewise=True)
    assert got == events
    assert rest == leftover


def test_request_head_helpers() -> None:
    rec = Recorder()
    RequestParser(rec).feed(b"POST http://a.example/ HTTP/1.1\r\nX-Thing: 1\r\nx-thing: 2\r\n"
                            b"Content-Length: 3\r\n\r\nabc")
    head = rec.heads[0]
    assert head.header(b"x-thing") == b"1"
    assert head.header(b"missing") is None
    assert head.has_body
    assert head.head_bytes > 0
    rec2 = Recorder()
    RequestParser(rec2).feed(GET_A)
    assert not rec2.heads[0].has_body


def test_in_head_tracks_a_partial_head() -> None:
    rec = Recorder()
    parser = RequestParser(rec)
    assert not parser.in_head
    parser.feed(GET_A[:10])
    assert parser.in_head
    parser.feed(GET_A[10:])
    assert not parser.in_head
    assert coalesce(rec.events) == [HEAD_A, ("end",)]


BAD_REQUESTS = [
    pytest.param(b"POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\nhello\r\n0\r\n\r\n", ClientProtocolError, 400, {}, id="cl-and-te"),
    pytest.param(b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
                 b"5\r\nhello\r\n0\r\n\r\n", ClientProtocolError, 400, {}, id="te-and-cl"),
    pytest.param(b"POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
                 ClientProtocolError, 400, {}, id="duplicate-cl-same"),
    pytest.param(b"POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
                 ClientProtocolError, 400, {}, id="duplicate-cl-different"),
    pytest.param(b"POST http://a/ HTTP/1.1\r\nContent-Length: abc\r\n\r\n", ClientProtocolError, 400, {},
                 id="cl-not-a-number"),
    pytest.param(b"POST http://a/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n", ClientProtocolError, 400, {},
                 id="cl-negative"),
    pytest.param(b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", ClientProtocolError,
                 400, {}, id="bad-chunk-size"),
    pytest.param(b"GET http://a/ HTTP/1.1\nHost: a\n\n", ClientProtocolError, 400, {}, id="bare-lf"),
    pytest.param(b"GARBAGE\r\n\r\n", ClientProtocolError, 400, {}, id="not-http"),
    pytest.param(b"GET http://a/ HTTP/1.1\r\nBad Header: x\r\n\r\n", ClientProtocolError, 400, {},
                 id="space-in-header-name"),
    pytest.param(b"GET http://a/ HTTP/1.1\r\nX: " + b"y" * 2000 + b"\r\n\r\n", HeadTooLarge, 431,
                 {"max_head_bytes": 1024}, id="header-over-byte-limit"),
    pytest.param(b"GET http://a/" + b"p" * 2000 + b" HTTP/1.1\r\n\r\n", HeadTooLarge, 431,
                 {"max_head_bytes": 1024}, id="request-line-over-byte-limit"),
    pytest.param(b"GET http://a/ HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(11)) + b"\r\n",
                 HeadTooLarge, 431, {"max_headers": 10}, id="too-many-headers"),
]


@pytest.mark.parametrize(("data", "error", "status", "limits"), BAD_REQUESTS)
@pytest.mark.parametrize("bytewise", [False, True], ids=["one-feed", "bytewise"])
def test_bad_requests(data: bytes, error: type, status: int, limits: dict, bytewise: bool) -> None:
    with pytest.raises(error) as info:
        feed_requests(data, bytewise=bytewise, **limits)
    assert type(info.value) is error
    assert info.value.status == status


# Lenient request lines llhttp takes (RFC 9112 2.3, 3): refused with (status, reason). Each
# case is also fed after a valid request in the same feed (pipelined) and byte by byte.
STRICT_LINES = [
    pytest.param(b"GET /\r\n\r\n", 400, "bad_request_line", id="http-0.9-style"),
    pytest.param(b"GET http://a/\r\nHost: a\r\n\r\n", 400, "bad_request_line", id="no-version-absolute"),
    pytest.param(b"GET http://a/ HTTP/0.9\r\nHost: a\r\n\r\n", 400, "bad_request_line", id="http-0.9"),
    pytest.param(b"GET http://a/ HTTP/2.0\r\nHost: a\r\n\r\n", 505, "http_version_not_supported",
                 id="http-2.0"),
    pytest.param(b"CONNECT a:443 HTTP/2.0\r\nHost: a:443\r\n\r\n", 505, "http_version_not_supported",
                 id="connect-http-2.0"),
    pytest.param(b"GET  http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request_line", id="two-spaces-before"),
    pytest.param(b"GET http://a/  HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request_line", id="two-spaces-after"),
    pytest.param(b"GET    http://a/    HTTP/1.0\r\n\r\n", 400, "bad_request_line", id="many-spaces"),
    pytest.param(b"CONNECT  a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 400, "bad_request_line",
                 id="connect-two-spaces"),
    pytest.param(b"GET\thttp://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request", id="tab-after-method"),
    pytest.param(b"GET http://a/\tHTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request", id="tab-before-version"),
    pytest.param(b"GET http://a/ HTTP/1.1 \r\nHost: a\r\n\r\n", 400, "bad_request", id="space-at-end"),
    pytest.param(b" GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request", id="space-first"),
    pytest.param(b"GET http://a/ HTTP/1.1\x0b\r\nHost: a\r\n\r\n", 400, "bad_request", id="vtab-at-end"),
    pytest.param(b"GET http://a/ HTTP/1.2\r\nHost: a\r\n\r\n", 400, "bad_request", id="http-1.2"),
    # Transfer-Encoding other than exactly chunked: the body's meaning would change (RFC 9112 6.1)
    pytest.param(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
                 501, "unsupported_transfer_coding", id="te-gzip-chunked"),
    pytest.param(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked"
                 b"\r\n\r\n0\r\n\r\n", 501, "unsupported_transfer_coding", id="te-two-fields"),
    pytest.param(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501,
                 "unsupported_transfer_coding", id="te-gzip-alone"),
    pytest.param(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\nContent-Length: 0"
                 b"\r\n\r\n", 501, "unsupported_transfer_coding", id="te-identity"),
]


@pytest.mark.parametrize(("data", "status", "reason"), STRICT_LINES)
@pytest.mark.parametrize("bytewise", [False, True], ids=["one-feed", "bytewise"])
@pytest.mark.parametrize("after", [b"", GET_A, b"\r\n", b"POST http://a/ HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"],
                         ids=["first", "pipelined", "after-empty-line", "after-body"])
def test_strict_request_lines(data: bytes, status: int, reason: str, bytewise: bool, after: bytes) -> None:
    with pytest.raises(ClientProtocolError) as info:
        feed_requests(after + data, bytewise=bytewise)
    assert (info.value.status, info.value.reason) == (status, reason), info.value.detail


WELL_FORMED_LINES = [
    pytest.param(b"\r\n" + GET_A, id="empty-line-first"),
    pytest.param(GET_A + GET_A, id="same-line-twice"),
    pytest.param(b"POST http://a/ HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyz" + GET_A, id="after-body"),
    pytest.param(b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\n" + GET_A,
                 id="after-chunked-body"),
    pytest.param(b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding:  Chunked \r\n\r\n0\r\n\r\n", id="te-chunked-case"),
    pytest.param(b"GET http://a.example/x%20y?q=a+b HTTP/1.0\r\n\r\n", id="http-1.0"),
    pytest.param(b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n", id="connect"),
]


@pytest.mark.parametrize("data", WELL_FORMED_LINES)
@pytest.mark.parametrize("bytewise", [False, True], ids=["one-feed", "bytewise"])
def test_well_formed_request_lines_pass(data: bytes, bytewise: bool) -> None:
    events, _ = feed_requests(data, bytewise=bytewise)
    assert events and events[0][0] == "head"


def test_limits_are_inclusive_of_exactly_enough() -> None:
    ten = b"GET http://a/ HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(10)) + b"\r\n"
    events, _ = feed_requests(ten, max_headers=10)
    assert len(events[0][7]) == 10


def test_unterminated_head_over_the_limit_fails_before_it_ends() -> None:
    """A client that never finishes its head cannot make the parser buffer without bound."""
    parser = RequestParser(Recorder(), max_head_bytes=1024)
    parser.feed(b"GET http://a/ HTTP/1.1\r\nX-Long: ")
    with pytest.raises(HeadTooLarge):
        for _ in range(100):
            parser.feed(b"y" * 100)


def test_body_then_partial_next_head_in_one_feed_is_not_too_large() -> None:
    rec = Recorder()
    parser = RequestParser(rec, max_head_bytes=1024)
    body = b"x" * 5000
    parser.feed(b"POST http://a/ HTTP/1.1\r\nContent-Length: 5000\r\n\r\n" + body + b"GET http://b/ HTTP/1.1\r\n")
    parser.feed(b"Host: b\r\n\r\n")
    assert [e[0] for e in coalesce(rec.events)] == ["head", "body", "end", "head", "end"]


REFUSED_AFTER = [
    pytest.param(b"", [], id="first-request"),
    pytest.param(GET_A, [HEAD_A, ("end",)], id="after-a-good-request"),
]


@pytest.mark.parametrize(("before", "events"), REFUSED_AFTER)
def test_refused_head_reports_no_events(before: bytes, events: list[tuple]) -> None:
    rec = Recorder()
    refused = (b"POST http://b.example/ HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(11))
               + b"Content-Length: 8\r\n\r\nSMUGGLED")
    with pytest.raises(HeadTooLarge):
        RequestParser(rec, max_headers=10).feed(before + refused)
    assert coalesce(rec.events) == events


# ------------------------------------------------------------------------------ responses

def feed_response(method: str, *chunks: bytes, eof: bool = False, bytewise: bool = False) -> tuple[list, bool]:
    rec = Recorder()
    parser = ResponseParser(rec, method)
    data = b"".join(chunks)
    pieces = [data[i:i + 1] for i in range(len(data))] if bytewise else list(chunks)
    for piece in pieces:
        parser.feed(piece)
    if eof:
        parser.feed_eof()
    return coalesce(rec.events), parser.done


RESPONSES = [
    # (request method, wire, eof, events)
    pytest.param("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", False,
                 [("head", 200, b"OK", "1.1", True, 2, False, False, ((b"Content-Length", b"2"),)),
                  ("body", b"hi"), ("end",)], id="content-length"),
    pytest.param("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", False,
                 [("head", 200, b"OK", "1.1", True, 10, False, False, ((b"Content-Length", b"10"),)), ("end",)],
                 id="head-ends-at-head"),
    pytest.param("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", False,
                 [("head", 200, b"OK", "1.1", True, None, True, False, ((b"Transfer-Encoding", b"chunked"),)),
                  ("end",)], id="head-chunked-ends-at-head"),
    pytest.param("GET", b"HTTP/1.1 204 No Content\r\n\r\n", False,
                 [("head", 204, b"No Content", "1.1", True, None, False, False, ()), ("end",)], id="204"),
    pytest.param("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", False,
                 [("head", 304, b"Not Modified", "1.1", True, 10, False, False, ((b"Content-Length", b"10"),)),
                  ("end",)], id="304-with-length-has-no-body"),
    pytest.param("GET", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", False,
                 [("head", 100, b"Continue", "1.1", True, None, False, False, ()),
                  ("head", 200, b"OK", "1.1", True, 2, False, False, ((b"Content-Length", b"2"),)),
                  ("body", b"hi"), ("end",)], id="100-then-final"),
    pytest.param("GET", b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n", False,
                 [("head", 103, b"Early Hints", "1.1", True, None, False, False, ((b"Link", b"</s.css>"),)),
                  ("head", 200, b"OK", "1.1", True, None, True, False, ((b"Transfer-Encoding", b"chunked"),)),
                  ("body", b"hi"), ("end",)], id="103-then-chunked"),
    pytest.param("GET", b"HTTP/1.1 200 OK\r\n\r\nhello world", True,
                 [("head", 200, b"OK", "1.1", False, None, False, True, ()), ("body", b"hello world"), ("end",)],
                 id="close-delimited-ends-at-eof"),
    pytest.param("GET", b"HTTP/1.0 200 OK\r\nX: 1\r\n\r\nold", True,
                 [("head", 200, b"OK", "1.0", False, None, False, True, ((b"X", b"1"),)), ("body", b"old"),
                  ("end",)], id="http-1.0-close-delimited"),
    pytest.param("GET", b"HTTP/1.1 404 \r\nContent-Length: 0\r\n\r\n", False,
                 [("head", 404, b"", "1.1", True, 0, False, False, ((b"Content-Length", b"0"),)), ("end",)],
                 id="empty-reason"),
]


@pytest.mark.parametrize(("method", "wire", "eof", "events"), RESPONSES)
@pytest.mark.parametrize("bytewise", [False, True], ids=["one-feed", "bytewise"])
def test_response_events(method: str, wire: bytes, eof: bool, events: list, bytewise: bool) -> None:
    got, done = feed_response(method, wire, eof=eof, bytewise=bytewise)
    if bytewise:  # a split reason phrase is covered by test_reason_phrase_split_across_feeds
        got = [ev[:2] + ev[3:] if ev[0] == "head" else ev for ev in got]
        events = [ev[:2] + ev[3:] if ev[0] == "head" else ev for ev in events]
    assert got == events
    assert done


def test_reason_phrase_split_across_feeds() -> None:
    rec = Recorder()
    parser = ResponseParser(rec, "GET")
    parser.feed(b"HTTP/1.1 404 Not Fo")
    parser.feed(b"und\r\nContent-Length: 0\r\n\r\n")
    assert rec.heads[0].reason == b"Not Found"


def test_close_delimited_body_is_not_done_before_eof() -> None:
    rec = Recorder()
    parser = ResponseParser(rec, "GET")
    parser.feed(b"HTTP/1.1 200 OK\r\n\r\npart")
    assert not parser.done
    assert parser.started
    assert rec.heads[0].until_close and not rec.heads[0].keep_alive
    parser.feed_eof()
    assert parser.done
    assert coalesce(rec.events)[-1] == ("end",)


def test_feed_eof_after_done_is_a_no_op() -> None:
    rec = Recorder()
    parser = ResponseParser(rec, "GET")
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    parser.feed_eof()
    assert [e[0] for e in rec.events] == ["head", "end"]


TRUNCATED = [
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", id="short-content-length"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", id="no-last-chunk"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Len", id="inside-head"),
    pytest.param(b"", id="nothing"),
    pytest.param(b"HTTP/1.1 100 Continue\r\n\r\n", id="only-interim"),
]


@pytest.mark.parametrize("wire", TRUNCATED)
def test_truncated_response(wire: bytes) -> None:
    with pytest.raises(UpstreamProtocolError) as info:
        feed_response("GET", wire, eof=True)
    assert info.value.status == 502
    assert info.value.proxy_status == "http_response_incomplete"


BAD_RESPONSES = [
    pytest.param(b"garbage\r\n\r\n", id="not-http"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nhi", id="duplicate-cl"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", id="bad-cl"),
    pytest.param(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                 id="switching-protocols"),
]


BAD_CODINGS = [
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                 id="gzip-chunked"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc", id="gzip-until-close"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: br\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                 id="two-fields"),
]


@pytest.mark.parametrize("wire", BAD_CODINGS)
@pytest.mark.parametrize("bytewise", [False, True], ids=["one-feed", "bytewise"])
def test_response_transfer_codings_other_than_chunked_are_refused(wire: bytes, bytewise: bool) -> None:
    """Forwarded as chunked alone, ``gzip, chunked`` would reach the client as a body without
    its coding: refused before a byte of the head goes to the client (502, RFC 9112 6.1)."""
    rec = Recorder()
    parser = ResponseParser(rec, "GET")
    with pytest.raises(UpstreamProtocolError) as info:
        for piece in ([wire[i:i + 1] for i in range(len(wire))] if bytewise else [wire]):
            parser.feed(piece)
        parser.feed_eof()
    assert (info.value.status, info.value.reason) == (502, "unsupported_transfer_coding")
    assert rec.events == []


@pytest.mark.parametrize("wire", BAD_RESPONSES)
def test_bad_responses(wire: bytes) -> None:
    with pytest.raises(UpstreamProtocolError) as info:
        feed_response("GET", wire)
    assert info.value.status == 502
    assert info.value.proxy_status == "http_protocol_error"


def test_data_after_the_end_is_an_error() -> None:
    rec = Recorder()
    parser = ResponseParser(rec, "GET")
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert parser.done
    with pytest.raises(UpstreamProtocolError):
        parser.feed(b"HTTP/1.1 200 OK\r\n")


def test_response_header_limits() -> None:
    parser = ResponseParser(Recorder(), "GET", max_head_bytes=1024)
    with pytest.raises(HeadTooLarge) as info:
        parser.feed(b"HTTP/1.1 200 OK\r\nX: " + b"y" * 2000 + b"\r\n\r\n")
    assert info.value.status == 431
