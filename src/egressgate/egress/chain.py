"""CONNECT through a chained (upstream) proxy: the one client for it, used by ``reach`` (and so
by the proxy, the provider checks, the egress-IP probe) for ``upstream`` members.

``open_tunnel`` sends ``CONNECT host:port`` (with the chained proxy's own credentials) on a
connected ``Upstream`` and waits, bounded in time and size, for a 2xx reply head; it returns
the bytes that followed the head (the tunnel's first bytes). Any other reply, a close or no
reply in time is a ``TunnelRefused`` (an ``UpstreamError``) naming what happened: the chained
proxy was reached, so the caller need not mark it down.
"""

from __future__ import annotations

import asyncio

from ..errors import GatewayError, UpstreamError
from ..model import HostPort
from .upstream import Upstream

MAX_REPLY_HEAD = 64 * 1024


class TunnelRefused(UpstreamError):
    """The chained proxy answered, but no tunnel: a refusal, a close, garbage or no answer in time."""


def connect_request(dest: HostPort, authorization: str | None) -> bytes:
    lines = [f"CONNECT {dest} HTTP/1.1", f"Host: {dest}"]
    if authorization:
        lines.append(f"Proxy-Authorization: {authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def reply_status(head: bytes) -> int:
    """The status code of a reply head (``HTTP/1.x NNN ...``), 0 when it is not one."""
    parts = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 or not parts[1].isdigit():
        return 0
    return int(parts[1])


async def open_tunnel(up: Upstream, dest: HostPort, authorization: str | None, timeout: float) -> bytes:
    """CONNECT ``dest`` through the chained proxy ``up`` is connected to. On failure ``up`` is
    closed and the error raised; on success it is detached, ready for its new owner."""
    reader = HeadReader()
    up.attach(reader)
    up.transport.write(connect_request(dest, authorization))
    try:
        async with asyncio.timeout(timeout):
            head, rest = await reader.done
    except TimeoutError:
        up.transport.close()
        raise TunnelRefused("the upstream proxy did not answer CONNECT in time", reason="upstream_timeout",
                            status=504, proxy_status="connection_timeout") from None
    except BaseException:
        up.transport.close()
        raise
    status = reply_status(head)
    if not 200 <= status < 300:
        up.transport.close()
        line = head.split(b"\r\n", 1)[0][:200].decode("latin-1")
        raise TunnelRefused(f"the upstream proxy refused CONNECT {dest}: {line!r}" if status else
                            f"the upstream proxy answered CONNECT {dest} with garbage: {line!r}",
                            reason="upstream_refused",
                            proxy_status="proxy_internal_response" if status else "http_protocol_error")
    up.detach()
    return rest


class HeadReader:
    """The owner of an ``Upstream`` while the chained proxy's reply head is awaited: ``done``
    gets (the head, the bytes after it), or the failure."""

    __slots__ = ("done", "buf", "limit")

    def __init__(self, limit: int = MAX_REPLY_HEAD) -> None:
        self.done: asyncio.Future[tuple[bytes, bytes]] = asyncio.get_running_loop().create_future()
        self.buf = b""
        self.limit = limit

    def upstream_data(self, data: bytes) -> None:
        if self.done.done():
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end >= 0:
            self.done.set_result((self.buf[:end], self.buf[end + 4:]))
        elif len(self.buf) > self.limit:
            self.fail(TunnelRefused("oversized reply from the upstream proxy",
                                    proxy_status="http_response_header_section_size"))

    def upstream_eof(self) -> bool:
        self.upstream_lost(None)
        return False

    def upstream_lost(self, exc: Exception | None) -> None:  # noqa: ARG002
        self.fail(TunnelRefused("the upstream proxy closed the connection during CONNECT", reason="upstream_closed"))

    def upstream_pause_writing(self) -> None:
        pass

    def upstream_resume_writing(self) -> None:
        pass

    def crashed(self, where: str, exc: BaseException) -> None:
        self.fail(GatewayError(f"internal error in {where}: {type(exc).__name__}"))

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
