"""The PROXY protocol (HAProxy, versions 1 and 2) a TCP load balancer puts in front of a
connection to say who the real client is. Sans-IO.

``parse(buf)`` returns None while the header is incomplete, else ``(consumed, address)``:
the number of header bytes and the client's IP (None for a LOCAL / UNKNOWN header, e.g. the
load balancer's own health check). Anything else raises ``ClientProtocolError``.
"""

from __future__ import annotations

import ipaddress
import struct

from ..errors import ClientProtocolError

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_MAX = 107


def parse(buf: bytes) -> tuple[int, str | None] | None:
    if buf.startswith(V2_SIGNATURE[: len(buf)]) and len(buf) < 16:
        return None
    if buf.startswith(V2_SIGNATURE):
        return _parse_v2(buf)
    if b"PROXY "[: len(buf)] == buf[:6] and len(buf) < 6:
        return None
    if buf.startswith(b"PROXY "):
        return _parse_v1(buf)
    raise ClientProtocolError("expected a PROXY protocol header from the load balancer", reason="proxy_protocol")


def _parse_v1(buf: bytes) -> tuple[int, str | None] | None:
    end = buf.find(b"\r\n")
    if end < 0:
        if len(buf) >= _V1_MAX:
            raise ClientProtocolError("PROXY v1 header too long", reason="proxy_protocol")
        return None
    parts = buf[:end].decode("ascii", "replace").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return end + 2, None
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ClientProtocolError("malformed PROXY v1 header", reason="proxy_protocol")
    try:
        src = ipaddress.ip_address(parts[2])
        ipaddress.ip_address(parts[3])
        if not (0 <= int(parts[4]) < 65536 and 0 <= int(parts[5]) < 65536):
            raise ValueError
    except ValueError:
        raise ClientProtocolError("malformed PROXY v1 header", reason="proxy_protocol") from None
    if (src.version == 4) != (parts[1] == "TCP4"):
        raise ClientProtocolError("PROXY v1 address family mismatch", reason="proxy_protocol")
    return end + 2, str(src)


def _parse_v2(buf: bytes) -> tuple[int, str | None] | None:
    ver_cmd, fam, length = struct.unpack("!BBH", buf[12:16])
    if ver_cmd >> 4 != 2:
        raise ClientProtocolError("unsupported PROXY protocol version", reason="proxy_protocol")
    total = 16 + length
    if len(buf) < total:
        return None
    command = ver_cmd & 0x0F
    if command == 0:  # LOCAL: the proxy's own connection (health check)
        return total, None
    if command != 1:
        raise ClientProtocolError("unknown PROXY v2 command", reason="proxy_protocol")
    body = buf[16:total]
    family = fam >> 4
    if family == 1 and len(body) >= 12:  # AF_INET
        return total, str(ipaddress.IPv4Address(body[:4]))
    if family == 2 and len(body) >= 36:  # AF_INET6
        return total, str(ipaddress.IPv6Address(body[:16]))
    if family == 0:  # UNSPEC
        return total, None
    raise ClientProtocolError("unsupported PROXY v2 address family", reason="proxy_protocol")
