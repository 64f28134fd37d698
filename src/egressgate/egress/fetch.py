"""One HTTP(S) request through one egress member, over ``reach``: the small client of the
egress-IP probe (an echo URL), the token keys (an issuer's discovery document and JWKS) and the
provider checks (a provider's answer, or only its TLS handshake).

``fetch(reach, member, request, guard, timeout)`` -> ``Response``: the connection is
``Reach.open``'s (the guard the caller declares, the member's source address or chained proxy),
then TLS with SNI and certificate verification when ``request.tls`` is a context, then one
request with ``Connection: close`` and its answer read by ``http1.parse.ResponseParser``:
status, head, and a body bounded by ``max_body`` (over it: ``too_large``, or cut there with
``truncate``), read only when ``wants_body(status)`` says so. ``timeout`` bounds the whole
exchange. The connection is closed after the answer, whatever happened.

Failures after the connection is made are a ``FetchError`` whose ``kind`` names them (the
provider checks report it as their outcome): ``connect_timeout``, ``no_response``, ``tls_error``,
``reset``, ``closed``, ``bad_response``, ``too_large``, ``error``. Failures of the connection
itself are ``reach``'s typed errors, as they are.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import GatewayError
from ..http1.parse import ResponseHead, ResponseParser
from ..model import HostPort
from .plan import EgressPlan
from .reach import Guard, Reach
from .upstream import Upstream


@dataclass(frozen=True, slots=True)
class Request:
    """What to send: ``method`` None connects (and shakes hands) only."""

    dest: HostPort
    tls: ssl.SSLContext | None = None  # https: SNI and verification against dest.host
    method: str | None = "GET"
    target: str = "/"
    host: str = ""  # the Host field; default: dest as an authority
    headers: tuple[tuple[str, str], ...] = ()

    def wire(self) -> bytes:
        extra = "".join(f"{name}: {value}\r\n" for name, value in self.headers)
        return (f"{self.method} {self.target} HTTP/1.1\r\nHost: {self.host or self.dest}\r\n{extra}"
                "Connection: close\r\n\r\n").encode("latin-1")


def get(url: str, headers: tuple[tuple[str, str], ...] = (), ca_file: str | None = None) -> Request:
    """A GET of an ``http://`` or ``https://`` URL (``ca_file``: the CAs to verify against;
    default the system's). ``ValueError`` for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url[:200]!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    dest = HostPort(parts.hostname, port)
    host = f"[{dest.host}]" if ":" in dest.host else dest.host
    if parts.port:
        host += f":{parts.port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    tls = ssl.create_default_context(cafile=ca_file) if parts.scheme == "https" else None
    return Request(dest, tls, "GET", target, host, headers)


@dataclass(frozen=True, slots=True)
class Response:
    status: int | None  # None: no request was sent (``Request.method`` None)
    head: bytes  # status line and header fields (``egress.providers.judge_answer`` reads them)
    body: bytes
    tls_version: str | None
    remote: str  # where the connection went: "203.0.113.9:443", or "host:443 via <chained proxy>"
    egress: str  # the local address it left from, or the chained proxy


class FetchError(GatewayError):
    status = 502
    proxy_status = "proxy_internal_error"

    def __init__(self, kind: str, detail: str, remote: str | None = None, egress: str | None = None) -> None:
        super().__init__(detail, reason=kind)
        self.kind = kind
        self.remote = remote
        self.egress = egress


def where(member: EgressPlan, dest: HostPort, up: Upstream) -> tuple[str, str]:
    """(remote, egress) of a connection ``reach`` made through ``member`` to ``dest``."""
    if member.upstream is not None:
        return f"{dest} via {member.upstream}", str(member.upstream)
    remote = f"[{up.remote}]" if ":" in up.remote else up.remote
    return f"{remote}:{dest.port}", up.local


async def fetch(reach: Reach, member: EgressPlan, request: Request, guard: Guard, timeout: float, *,
                max_body: int = 65536, truncate: bool = False, wants_body: Callable[[int], bool] | None = None,
                what: str = "server") -> Response:
    """One request through ``member`` (see the module's docstring); ``what`` names the far end
    in errors ("echo service", "issuer", "provider")."""
    up: Upstream | None = None
    try:
        async with asyncio.timeout(timeout):
            up = await reach.open(member, request.dest, guard, timeout)
            remote, egress = where(member, request.dest, up)
            try:
                return await _exchange(up, request, _Reader(request.method or "GET", max_body, truncate, wants_body,
                                                            what), remote, egress)
            except FetchError as exc:
                exc.remote, exc.egress = remote, egress
                raise
            finally:
                up.detach()
                up.transport.abort() if request.tls is not None else up.transport.close()
    except TimeoutError:
        if up is None:
            raise FetchError("connect_timeout", f"timed out after {timeout:g}s: no connection") from None
        remote, egress = where(member, request.dest, up)
        raise FetchError("no_response", f"timed out after {timeout:g}s: no answer", remote, egress) from None


async def _exchange(up: Upstream, request: Request, reader: _Reader, remote: str, egress: str) -> Response:
    rest = up.take_early()
    version = None
    if request.tls is not None:
        if rest:
            raise FetchError("bad_response", f"the {reader.what} spoke before the TLS handshake")
        try:
            up.transport = await asyncio.get_running_loop().start_tls(up.transport, up, request.tls,
                                                                      server_hostname=request.dest.host)
        except ssl.SSLError as exc:
            raise FetchError("tls_error", _tls_detail(exc)) from None
        except ConnectionResetError:
            raise FetchError("reset", "connection reset during the TLS handshake") from None
        except (ConnectionError, OSError) as exc:
            raise FetchError("closed", f"the connection ended during the TLS handshake: {exc}") from None
        ssl_object = up.transport.get_extra_info("ssl_object")
        version = ssl_object.version() if ssl_object else "TLS"
    if request.method is None:
        return Response(None, b"", b"", version, remote, egress)
    up.attach(reader)
    up.transport.write(request.wire())
    if rest:
        reader.upstream_data(rest)
    await reader.done
    return Response(reader.status, reader.head, bytes(reader.body), version, remote, egress)


def _tls_detail(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    return exc.reason or str(exc)


class _Reader:
    """The owner of the ``Upstream`` while the answer is read (a ``ResponseSink`` too)."""

    __slots__ = ("done", "parser", "status", "head", "body", "max_body", "truncate", "wants_body", "what")

    def __init__(self, method: str, max_body: int, truncate: bool, wants_body: Callable[[int], bool] | None,
                 what: str) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.parser = ResponseParser(self, method)
        self.status: int | None = None
        self.head = b""
        self.body = bytearray()
        self.max_body = max_body
        self.truncate = truncate
        self.wants_body = wants_body
        self.what = what

    # the connection's events
    def upstream_data(self, data: bytes) -> None:
        if self.done.done():
            return
        try:
            self.parser.feed(data)
        except GatewayError as exc:
            self._fail("bad_response", f"{exc.detail} (the {self.what}'s answer)")

    def upstream_eof(self) -> bool:
        if not self.done.done() and self.status is not None:
            try:
                self.parser.feed_eof()  # (ends an answer delimited by the close)
            except GatewayError:
                if self.truncate:  # the start of the body is all that is wanted
                    self.done.set_result(None)
        self.upstream_lost(None)
        return False

    def upstream_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, ConnectionResetError):
            self._fail("reset", f"connection reset by the {self.what} before it answered" if self.status is None else
                       f"connection reset by the {self.what} during its answer")
        elif self.status is None:
            self._fail("closed", f"the {self.what} closed the connection before answering" if exc is None else
                       f"the connection was lost before an answer: {exc}")
        else:
            self._fail("closed", f"the {self.what} closed the connection before its answer was complete")

    def upstream_pause_writing(self) -> None:
        pass

    def upstream_resume_writing(self) -> None:
        pass

    def crashed(self, where: str, exc: BaseException) -> None:
        self._fail("error", f"internal error in {where}: {type(exc).__name__}")

    # the parser's events
    def on_response_head(self, head: ResponseHead) -> None:
        if head.informational:
            return
        self.status = head.status
        fields = b"".join(b"\r\n" + name + b": " + value for name, value in head.headers)
        self.head = f"HTTP/{head.version} {head.status} ".encode() + head.reason + fields
        if self.wants_body is not None and not self.wants_body(head.status):
            self.done.set_result(None)

    def on_response_body(self, data: bytes) -> None:
        if self.done.done():
            return
        self.body += data
        if len(self.body) >= self.max_body:
            if self.truncate:
                del self.body[self.max_body:]
                self.done.set_result(None)
            elif len(self.body) > self.max_body:
                self._fail("too_large", f"the {self.what}'s answer is over {self.max_body} bytes")

    def on_response_end(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def _fail(self, kind: str, detail: str) -> None:
        if not self.done.done():
            self.done.set_exception(FetchError(kind, detail))
