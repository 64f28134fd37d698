"""Header rewriting for forwarding (RFC 9110 §7.6): hop-by-hop fields removed, ``Via`` added,
``Host`` made to agree with the absolute URI, framing re-declared by the proxy. Sans-IO.

What a forwarded request says about the client is a ``Forwarding`` value, compiled once from
the ``forwarding`` config (``build.py``): by default the fields a client (or a proxy in front
of the gateway) sends to name client addresses (``CLIENT_ADDRESS_FIELDS``: X-Forwarded-For,
Forwarded, X-Real-IP, ...) are removed, the gateway never adds the client's address, and
``Via`` names this hop only by the pseudonym ``egressgate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import httptools

from ..errors import ClientProtocolError
from ..model import HostPort
from .parse import RequestHead, ResponseHead, _tokens

# Fields that describe one hop and never pass a proxy. Transfer-Encoding and Content-Length
# are re-declared by the proxy itself from the parsed framing.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"proxy-authenticate",
    b"te", b"trailer", b"transfer-encoding", b"upgrade", b"content-length",
})
PROFILE_HEADER = b"x-egressgate-profile"
# Response fields only the gateway sets (block-aware egress, ``proxy.blocks``): an origin's own
# is dropped, so a job never takes a provider's word for its egress state. (The same one set
# lookup per field as the hop-by-hop ones: no extra cost.)
_REMOVED_ON_RESPONSE = HOP_BY_HOP | {b"egress-block-state"}
_REMOVED_ON_REQUEST = HOP_BY_HOP | {b"host", PROFILE_HEADER}
# Request fields that carry client addresses or internal host names; removed unless the
# config says ``forwarding.x_forwarded_for: keep``.
CLIENT_ADDRESS_FIELDS = frozenset({
    b"forwarded", b"x-forwarded-for", b"x-forwarded-host", b"x-real-ip", b"x-client-ip", b"true-client-ip",
    b"x-originating-ip", b"client-ip",
})
VIA = b"1.1 egressgate"  # this hop in Via: a pseudonym, never a host name or address


@dataclass(frozen=True, slots=True)
class Forwarding:
    """What forwarded messages say about this hop and the client: ``via`` is the Via entry to
    add (None: add none), ``removed`` the request fields never forwarded."""

    via: bytes | None = VIA
    removed: frozenset[bytes] = _REMOVED_ON_REQUEST | CLIENT_ADDRESS_FIELDS

    @classmethod
    def compile(cls, via: bool, x_forwarded_for: str) -> Forwarding:
        """From the config: ``via`` on or off, ``x_forwarded_for`` "strip" or "keep"."""
        removed = _REMOVED_ON_REQUEST if x_forwarded_for == "keep" else _REMOVED_ON_REQUEST | CLIENT_ADDRESS_FIELDS
        return cls(VIA if via else None, removed)


DEFAULT_FORWARDING = Forwarding()


@dataclass(frozen=True, slots=True)
class AbsoluteTarget:
    """An absolute-form request target, split for forwarding."""

    dest: HostPort
    origin_form: bytes  # path and query for the request line
    host_header: bytes


def parse_absolute_target(target: str) -> AbsoluteTarget:
    """Split ``http://host[:port]/path?query``; origin-form or other schemes are refused."""
    if target.startswith("/") or target == "*":
        raise ClientProtocolError("this is a proxy: send an absolute URI (http://host/path) or CONNECT",
                                  reason="origin_form")
    try:
        url = httptools.parse_url(target.encode("latin-1"))
    except httptools.HttpParserInvalidURLError:
        raise ClientProtocolError(f"invalid request target {target[:200]!r}", reason="bad_target") from None
    scheme = (url.schema or b"").lower()
    if scheme == b"https":
        raise ClientProtocolError("https:// URLs go through a CONNECT tunnel, not as a plain request",
                                  reason="bad_scheme")
    if scheme != b"http" or not url.host:
        raise ClientProtocolError(f"unsupported request target {target[:200]!r}", reason="bad_scheme")
    if url.userinfo:
        raise ClientProtocolError("credentials in the request URL are not forwarded; use headers",
                                  reason="bad_target")
    host = url.host.decode("latin-1")
    port = url.port if url.port is not None else 80
    dest = HostPort.parse_authority(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    path = url.path or b"/"
    origin_form = path + b"?" + url.query if url.query is not None else path
    shown = f"[{dest.host}]" if ":" in dest.host else dest.host
    host_header = (shown if port == 80 else f"{shown}:{port}").encode("ascii")
    return AbsoluteTarget(dest, origin_form, host_header)


def connection_tokens(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The header names listed in Connection fields (lower case)."""
    return _tokens(headers)


def request_head_bytes(head: RequestHead, target: AbsoluteTarget, fwd: Forwarding = DEFAULT_FORWARDING,
                       proxy_authorization: str | None = None, absolute: bool = False) -> bytes:
    """The request head to send upstream (HTTP/1.1, persistent), rewritten as ``fwd`` says.

    ``absolute`` keeps the absolute-form target, for a chained upstream proxy, which then
    also receives ``proxy_authorization``.
    """
    named = head.connection
    line_target = head.target.encode("latin-1") if absolute else target.origin_form
    out = [head.method.encode("ascii"), b" ", line_target, b" HTTP/1.1\r\nHost: ", target.host_header, b"\r\n"]
    _end_to_end(out, head.headers, fwd.removed, named, fwd.via)
    if head.chunked:
        out.append(b"Transfer-Encoding: chunked\r\n")
    elif head.content_length is not None:
        out += (b"Content-Length: ", str(head.content_length).encode(), b"\r\n")
    if proxy_authorization:
        out += (b"Proxy-Authorization: ", proxy_authorization.encode("latin-1"), b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def _end_to_end(out: list[bytes], headers: list[tuple[bytes, bytes]], removed: frozenset[bytes],
                named: frozenset[bytes], via: bytes | None) -> None:
    """Append the end-to-end header fields, and one Via field with this hop added (``via``
    None: the Via fields received, joined, and no entry for this hop)."""
    vias = []
    for name, value in headers:
        lname = name.lower()
        if lname in removed or lname in named:
            continue
        if lname == b"via":
            vias.append(value)
            continue
        out += (name, b": ", value, b"\r\n")
    if via is not None:
        vias.append(via)
    if vias:
        out += (b"Via: ", b", ".join(vias), b"\r\n")


def response_framing(head: ResponseHead, client_version: str, request_method: str) -> str:
    """How the body goes to the client: "length", "chunked", "close" or "none"."""
    if head.informational or head.status in (204, 304) or request_method == "HEAD":
        return "none"
    if head.content_length is not None:
        return "length"
    return "chunked" if client_version == "1.1" else "close"


def response_head_bytes(head: ResponseHead, via: bytes | None, framing: str, keep_alive: bool) -> bytes:
    """The response head to send to the client; ``framing`` comes from ``response_framing``."""
    named = head.connection
    reason = head.reason or b"-"
    out = [b"HTTP/1.1 ", str(head.status).encode(), b" ", reason, b"\r\n"]
    _end_to_end(out, head.headers, _REMOVED_ON_RESPONSE, named, via)
    if head.content_length is not None and framing in ("length", "none") and keeps_length(head):
        out += (b"Content-Length: ", str(head.content_length).encode(), b"\r\n")
    elif framing == "chunked":
        out.append(b"Transfer-Encoding: chunked\r\n")
    if not head.informational:
        out.append(b"Connection: keep-alive\r\n" if keep_alive else b"Connection: close\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def keeps_length(head: ResponseHead) -> bool:
    # A response to HEAD keeps its Content-Length (it describes the GET body); so may a 304.
    return not head.informational and head.status != 204
