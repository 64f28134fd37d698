"""Incremental request and response parsing on llhttp (httptools). Sans-IO.

``RequestParser.feed(data)`` calls its sink's ``on_request_head(head)``, ``on_request_body(bytes)``
and ``on_request_end()`` for every message in ``data``; after a ``CONNECT`` head it returns
the bytes that follow the head (the start of the tunnel) and must not be fed again.

``ResponseParser`` does the same for responses (``on_response_head/body/end``), knowing which
responses have no body (to ``HEAD``, 1xx, 204, 304) and which run until the connection
closes (``feed_eof``).

Limits: a head over ``max_head_bytes`` raises ``HeadTooLarge`` (431), over ``max_headers``
header fields likewise; everything llhttp refuses (conflicting Content-Length, Content-Length
with Transfer-Encoding, bad chunking, bare LF, ...) raises ``ClientProtocolError`` (400).

Strict where llhttp is lenient (RFC 9112): a request line must be ``method SP target SP
HTTP/1.0`` or ``HTTP/1.1`` with exactly one space between the three (llhttp skips extra
spaces, takes ``HTTP/2.0`` and reads a line without a version as HTTP/0.9): an HTTP/0.9-style
line or extra spaces is 400 (``bad_request_line``), another version 505
(``http_version_not_supported``). A ``Transfer-Encoding`` other than exactly ``chunked`` (say
``gzip, chunked``) is refused, as the proxy would forward the body as chunked only and so
change its meaning: 501 for a request (``unsupported_transfer_coding``), 502 for a response.
"""

from __future__ import annotations

import re
from typing import Protocol

import httptools

from ..errors import ClientProtocolError, GatewayError, HeadTooLarge, UpstreamProtocolError

_NO_TOKENS: frozenset[bytes] = frozenset()


class RequestHead:
    """A parsed request head. ``connection`` holds the tokens of the Connection header(s);
    ``proxy_authorization`` and ``profile`` the first Proxy-Authorization and
    X-Egressgate-Profile values (captured while parsing, so the hot path never rescans)."""

    __slots__ = ("method", "target", "version", "headers", "keep_alive", "content_length", "chunked",
                 "head_bytes", "connection", "proxy_authorization", "profile")

    def __init__(self, method: str, target: str, version: str, headers: list[tuple[bytes, bytes]],
                 keep_alive: bool, content_length: int | None, chunked: bool, head_bytes: int,
                 connection: frozenset[bytes] | None = None, proxy_authorization: bytes | None = None,
                 profile: bytes | None = None) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = chunked
        self.head_bytes = head_bytes
        self.connection = connection if connection is not None else _tokens(headers)
        self.proxy_authorization = proxy_authorization if proxy_authorization is not None else \
            self.header(b"proxy-authorization")
        self.profile = profile if profile is not None else self.header(b"x-egressgate-profile")

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (name in lower case)."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class ResponseHead:
    __slots__ = ("status", "reason", "version", "headers", "keep_alive", "content_length", "chunked",
                 "until_close", "informational", "connection")

    def __init__(self, status: int, reason: bytes, version: str, headers: list[tuple[bytes, bytes]],
                 keep_alive: bool, content_length: int | None, chunked: bool, until_close: bool,
                 connection: frozenset[bytes] | None = None) -> None:
        self.connection = connection if connection is not None else _tokens(headers)
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = chunked
        self.until_close = until_close
        self.informational = 100 <= status < 200


def _tokens(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens) if tokens else _NO_TOKENS


_CONTENT_LENGTH, _TRANSFER_ENCODING, _CONNECTION, _PROXY_AUTHORIZATION, _PROFILE, _HOST = range(6)
_SPECIAL = {b"content-length": _CONTENT_LENGTH, b"transfer-encoding": _TRANSFER_ENCODING,
            b"connection": _CONNECTION, b"proxy-authorization": _PROXY_AUTHORIZATION,
            b"x-egressgate-profile": _PROFILE, b"host": _HOST}
# RFC 9110 §7.2 / RFC 3986 §3.2: Host = uri-host [ ":" port ]; empty is allowed.
_VALID_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?\Z")


class RequestSink(Protocol):
    def on_request_head(self, head: RequestHead) -> None: ...
    def on_request_body(self, data: bytes) -> None: ...
    def on_request_end(self) -> None: ...


class ResponseSink(Protocol):
    def on_response_head(self, head: ResponseHead) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_end(self) -> None: ...


class _HeadCollector:
    """Shared llhttp callbacks for heads: URL and header accumulation with limits."""

    __slots__ = ("_parser", "_url", "_headers", "_size", "_max_bytes", "_max_headers", "_error",
                 "_content_length", "_chunked", "_in_head", "_connection", "_proxy_auth", "_profile",
                 "_hosts", "_bad_host", "_progress", "_stalled")

    def __init__(self, max_bytes: int, max_headers: int) -> None:
        self._max_bytes = max_bytes
        self._max_headers = max_headers
        self._error: Exception | None = None
        self._in_head = False
        self._progress = False  # a message began or ended, a head completed or body bytes came
        self._stalled = 0  # bytes fed since the last feed that made progress
        self._reset()

    def _stall_guard(self, n: int) -> bool:
        """True when too many bytes went by without progress. llhttp hands a header value,
        a reason phrase or a trailer to us only once it ends, and httptools accumulates it
        meanwhile, so a field that never ends is measured here, as bytes arrive: a head, a
        chunk header or a trailer section longer than the head limit (plus slack for framing)
        is refused (undercounts by at most one read)."""
        if self._progress:
            self._progress = False
            self._stalled = 0
            return False
        self._stalled += n
        return self._stalled > self._max_bytes + 1024

    def _unsupported_coding(self, value: bytes) -> GatewayError:
        """The error for a Transfer-Encoding other than exactly ``chunked``."""
        raise NotImplementedError

    def _reset(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._size = 0
        self._content_length: int | None = None
        self._chunked = False
        self._connection: frozenset[bytes] = _NO_TOKENS
        self._proxy_auth: bytes | None = None
        self._profile: bytes | None = None
        self._hosts = 0  # Host field lines seen
        self._bad_host = False

    # llhttp callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._reset()
        self._in_head = True
        self._progress = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._size += len(url)
        if self._size > self._max_bytes:
            self._error = HeadTooLarge("request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._size += len(name) + len(value) + 4
        if self._size > self._max_bytes:
            self._error = HeadTooLarge(f"header section over {self._max_bytes} bytes")
        elif len(self._headers) > self._max_headers:
            self._error = HeadTooLarge(f"more than {self._max_headers} header fields")
        special = _SPECIAL.get(name.lower())
        if special is None:
            return
        if special == _CONTENT_LENGTH:
            self._content_length = int(value) if value.strip().isdigit() else -1
        elif special == _TRANSFER_ENCODING:
            if value.lower().rstrip().endswith(b"chunked"):
                self._chunked = True
            if value.strip().lower() != b"chunked" and self._error is None:  # RFC 9112 6.1
                self._error = self._unsupported_coding(value)
        elif special == _CONNECTION:
            self._connection = self._connection.union(t.strip().lower() for t in value.split(b","))
        elif special == _PROXY_AUTHORIZATION:
            if self._proxy_auth is None:
                self._proxy_auth = value
        elif special == _HOST:
            self._hosts += 1
            if not _VALID_HOST.match(value.strip()):
                self._bad_host = True
        elif self._profile is None:
            self._profile = value


_HTTP_SLASH = b" HTTP/"


class RequestParser(_HeadCollector):
    __slots__ = ("_sink", "_http", "_head", "_pending_close", "_chunk", "_scan", "_carry")

    def __init__(self, sink: RequestSink, max_head_bytes: int = 65536, max_headers: int = 100) -> None:
        super().__init__(max_head_bytes, max_headers)
        self._sink = sink
        self._http = httptools.HttpRequestParser(self)
        self._head: RequestHead | None = None
        self._pending_close = False  # a complete message said Connection: close; ignore the rest
        # The request line's spaces, which llhttp does not report (see _line_ok): the bytes of
        # this feed, where in them the last request line checked ended, and the bytes of
        # earlier feeds while a head is incomplete across feeds.
        self._chunk = b""
        self._scan = 0
        self._carry: bytearray | None = None

    @property
    def in_head(self) -> bool:
        """True while a request head has begun but is not complete."""
        return self._in_head

    def close(self) -> None:
        """No more bytes will come: let go of llhttp's parser (it holds this object: a cycle only
        the garbage collector would otherwise break, keeping the sink and everything it holds
        alive until then). ``feed`` ignores bytes from now on."""
        self._http = None
        self._chunk = b""
        self._carry = None

    def feed(self, data: bytes) -> bytes | None:
        while not self._pending_close and self._http is not None:  # a loop, not recursion: pipelined Upgrade
            self._chunk = data
            self._scan = 0
            try:
                self._http.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                rest = self._upgrade(data, exc.args[0])
                if rest is None:
                    return None
                if self._head is not None and self._head.method == "CONNECT":
                    return rest
                data = rest  # go on parsing what follows the Upgrade request, with a new parser
                continue
            except httptools.HttpParserError as exc:
                if self._error is not None:
                    raise self._error from None
                if self._pending_close:
                    return None
                cause = exc.__context__
                if isinstance(cause, ClientProtocolError):
                    raise cause from None
                raise ClientProtocolError(f"malformed request: {exc}") from None
            if self._error is not None:
                raise self._error
            if self._stall_guard(len(data)):
                raise HeadTooLarge(f"request head, chunk header or trailer section over {self._max_bytes} bytes")
            if self._in_head:  # a head goes on in the next feed: keep its request line's bytes
                self._keep_carry(data)
            self._chunk = b""
            return None
        return None

    def _keep_carry(self, data: bytes) -> None:
        """The bytes from the end of the last checked request line (or of the carry so far)
        on: they hold the start of the incomplete head. Bounded: ``_stall_guard`` refuses a
        head that goes on for more than the head limit."""
        if self._carry is None:
            self._carry = bytearray(data[self._scan:])
        else:
            self._carry += data

    def _find_line(self, method: bytes) -> bool:
        """Is the request line exactly ``method SP target SP HTTP/``, when the quick test in
        ``on_headers_complete`` could not tell (pipelined requests, a head split across reads,
        empty lines first)? The exact line is looked for after the last one checked. (The
        same line inside an earlier request's body in the same read would be found instead:
        a client can only hide its own extra spaces that way, which the proxy drops anyway,
        as it writes its own request line.)"""
        carry = self._carry
        buf = chunk = self._chunk
        start = self._scan
        if carry is not None:  # the head began in an earlier feed
            buf = bytes(carry) + chunk
            start = 0
        line = method + b" " + self._url + _HTTP_SLASH
        i = buf.find(line, start)
        if i < 0:
            return False
        self._scan = max(0, i + len(line) - (len(buf) - len(chunk)))
        return True

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head = None

    def _upgrade(self, data: bytes, offset: int) -> bytes | None:
        """After a CONNECT head: the tunnel's first bytes. After another request with Upgrade
        (h2c, websocket), which we forward as a plain request (the proxy removes Upgrade as a
        hop-by-hop header, so the message is complete): what follows it, for a new parser."""
        if self._error is not None:
            raise self._error
        head = self._head
        if head is not None and head.method == "CONNECT":
            return data[offset:]
        if head is not None and head.has_body:
            raise ClientProtocolError("Upgrade requests with a body are not supported")
        self._http = httptools.HttpRequestParser(self)
        return data[offset:] or None

    def _unsupported_coding(self, value: bytes) -> GatewayError:
        return ClientProtocolError(f"Transfer-Encoding {value[:64].decode('latin-1')!r} is not forwarded: "
                                   "only chunked alone", reason="unsupported_transfer_coding", status=501)

    def on_headers_complete(self) -> None:
        http = self._http
        self._in_head = False
        self._progress = True
        if self._error is not None:
            return
        raw_method = http.get_method()
        version = http.get_http_version()
        if version != "1.1" and version != "1.0":  # RFC 9112 2.3, 3
            self._error = _version_error(version)
            return
        # One space each side of the target: llhttp skips extra ones, so the bytes are looked at.
        # The quick test: this read starts with the head, whose first CRLF is where a line
        # with single spaces ends ("HTTP/x.y" is 8 bytes: llhttp takes one digit each side).
        line_end = len(raw_method) + len(self._url) + 10
        if self._scan == 0 and self._carry is None and self._chunk.find(b"\r\n", 0, line_end + 2) == line_end:
            self._scan = line_end
        elif self._find_line(raw_method):
            self._carry = None
        else:
            self._error = ClientProtocolError("request line with extra whitespace: one space between method, "
                                              "target and version", reason="bad_request_line")
            return
        method = raw_method.decode("ascii", "replace")
        if self._content_length is not None and self._content_length < 0:
            self._error = ClientProtocolError("invalid Content-Length")
            return
        if self._hosts > 1 or self._bad_host:  # RFC 9112 §3.2: a server MUST answer 400
            self._error = ClientProtocolError("more than one Host header field" if self._hosts > 1
                                              else "invalid Host header field", reason="bad_host")
            return
        head = RequestHead(method, self._url.decode("latin-1"), version, self._headers,
                           http.should_keep_alive(), self._content_length, self._chunked, self._size,
                           self._connection, self._proxy_auth or b"", self._profile or b"")
        self._head = head
        self._sink.on_request_head(head)

    def on_body(self, body: bytes) -> None:
        self._progress = True
        if self._error is None and self._head is not None:
            self._sink.on_request_body(body)

    def on_message_complete(self) -> None:
        self._progress = True
        head = self._head
        if self._error is not None or head is None:
            return
        if head.method == "CONNECT":
            return  # the tunnel follows; reported through feed()'s return value
        if not head.keep_alive:
            self._pending_close = True
        self._sink.on_request_end()


def _version_error(version: str) -> ClientProtocolError:
    if version == "0.9":  # llhttp's reading of a line with no version
        return ClientProtocolError("request line without HTTP/1.1 or HTTP/1.0 (HTTP/0.9 is not served)",
                                   reason="bad_request_line")
    return ClientProtocolError(f"HTTP/{version} in an HTTP/1 request line: HTTP/1.1 or HTTP/1.0 only",
                               reason="http_version_not_supported", status=505)


class ResponseParser(_HeadCollector):
    __slots__ = ("_sink", "_http", "_no_body", "_until_close", "_done", "_reason")

    def __init__(self, sink: ResponseSink, request_method: str, max_head_bytes: int = 65536,
                 max_headers: int = 200) -> None:
        super().__init__(max_head_bytes, max_headers)
        self._sink = sink
        self._http = httptools.HttpResponseParser(self)
        self._no_body = request_method == "HEAD"
        self._until_close = False
        self._done = False
        self._reason = b""

    @property
    def done(self) -> bool:
        return self._done

    def _unsupported_coding(self, value: bytes) -> GatewayError:
        return UpstreamProtocolError(f"the origin's Transfer-Encoding {value[:64].decode('latin-1')!r} cannot be "
                                     "forwarded intact (chunked alone only)", reason="unsupported_transfer_coding")

    @property
    def reusable(self) -> bool:
        """True when the last response ended cleanly at a message boundary, so the next
        response on the same connection can be parsed by this parser (see ``rebind``)."""
        return self._done and not self._no_body and not self._until_close and self._error is None

    def rebind(self, sink: ResponseSink, request_method: str) -> None:
        """Parse the next response on the same connection, for a new request."""
        self._sink = sink
        self._no_body = request_method == "HEAD"
        self._until_close = False
        self._done = False

    @property
    def started(self) -> bool:
        return self._in_head or self._until_close or self._size > 0

    def feed(self, data: bytes) -> None:
        if self._done:
            raise UpstreamProtocolError("data after the end of the response")
        try:
            self._http.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise UpstreamProtocolError("the origin switched protocols, which this proxy does not relay") from None
        except httptools.HttpParserError as exc:
            if self._error is not None:
                raise self._error from None
            if self._done:  # e.g. after a response to HEAD: whatever follows retires the connection
                raise UpstreamProtocolError("data after the end of the response") from None
            raise UpstreamProtocolError(f"malformed response from the origin: {exc}") from None
        if self._error is not None:
            raise self._error
        if self._stall_guard(len(data)):
            raise UpstreamProtocolError(f"response head, chunk header or trailer section from the origin over "
                                        f"{self._max_bytes} bytes")

    def feed_eof(self) -> None:
        """The origin closed. Ends a close-delimited body; anything else is truncation."""
        if self._done:
            return
        if self._until_close and not self._in_head:
            self._done = True
            self._sink.on_response_end()
            return
        raise UpstreamProtocolError("the origin closed the connection before the response was complete",
                                    proxy_status="http_response_incomplete")

    def on_headers_complete(self) -> None:
        http = self._http
        self._in_head = False
        self._progress = True
        if self._error is not None or self._done:
            return
        status = http.get_status_code()
        if not 100 <= status <= 599:
            self._error = UpstreamProtocolError(f"invalid status code {status} from the origin")
            return
        if self._content_length is not None and self._content_length < 0:
            self._error = UpstreamProtocolError("invalid Content-Length from the origin")
            return
        bodiless = self._no_body or status in (204, 304) or 100 <= status < 200
        until_close = not bodiless and self._content_length is None and not self._chunked
        head = ResponseHead(status, self._reason, http.get_http_version(), self._headers,
                            http.should_keep_alive() and not until_close, self._content_length,
                            self._chunked, until_close, self._connection)
        self._until_close = until_close
        self._sink.on_response_head(head)
        if self._no_body and not head.informational:
            # llhttp cannot be told the request was HEAD; the message ends here.
            self._done = True
            self._sink.on_response_end()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reason = b""
        if self._done and self._error is None:
            # Bytes after the end of the response we asked for: the connection is unusable.
            self._error = UpstreamProtocolError("data after the end of the response")

    def on_status(self, reason: bytes) -> None:
        self._size += len(reason)
        if self._size > self._max_bytes:
            if self._error is None:
                self._error = UpstreamProtocolError(f"status line from the origin over {self._max_bytes} bytes")
            return
        self._reason += reason

    def on_body(self, body: bytes) -> None:
        self._progress = True
        if self._error is not None:
            return  # a refused head: not one byte of what follows reaches the client
        if self._done:
            if self._error is None:  # a body after a response to HEAD: never reuse this connection
                self._error = UpstreamProtocolError("data after the end of the response")
            return
        if not 100 <= self._http.get_status_code() < 200:
            self._sink.on_response_body(body)  # (a 1xx response's body, if any, is dropped)

    def on_message_complete(self) -> None:
        self._progress = True
        if self._done or self._error is not None:
            return
        if 100 <= self._http.get_status_code() < 200:
            return  # an interim response; the final one follows on the same parser
        self._done = True
        self._sink.on_response_end()
