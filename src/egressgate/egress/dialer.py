"""The only module that opens outbound sockets.

``Dialer.connect(plan, addresses, port, factory)`` connects to the first of ``addresses``
that answers and returns the protocol ``factory`` made, its ``remote`` set to that address (each already checked by the caller's address guard: the connect goes to
exactly that address, never to a second lookup), from the plan's source address when it has
one. A source address that cannot be bound raises ``SourceUnavailable`` so the caller can mark
it down and try the pool's next member. Sockets bound to a source address use
``IP_BIND_ADDRESS_NO_PORT`` so the kernel picks the port at connect time and a busy source
does not run out of ephemeral ports.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import os
import socket
from collections.abc import Callable

from ..errors import ConnectRefused, UpstreamError, UpstreamTimeout
from .plan import EgressPlan
from .upstream import Upstream

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class SourceUnavailable(UpstreamError):
    reason = "source_unavailable"
    proxy_status = "proxy_configuration_error"


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


class Dialer:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    async def connect(self, plan: EgressPlan, addresses: list[str], port: int,
                      factory: Callable[[], Upstream], timeout: float) -> Upstream:
        """The connected protocol, ``remote`` set to the address it reached."""
        last: Exception | None = None
        task = asyncio.current_task()
        fired: list[bool] = []

        def expire() -> None:
            fired.append(True)
            task.cancel()

        timer = self._loop.call_later(timeout, expire)  # cheaper than asyncio.timeout()
        try:
            try:
                for address in addresses:
                    if plan.source is not None and _family(plan.source) != _family(address):
                        last = UpstreamError(f"source {plan.source} cannot reach {address} (address family)",
                                             reason="family_mismatch")
                        continue
                    try:
                        # (each awaited here, not in a helper coroutine: every resumption of the
                        # dial resumes each coroutine up the chain, and a bound dial resumes twice)
                        if plan.source is None:
                            _, protocol = await self._loop.create_connection(factory, address, port)
                        else:
                            sock = _bound_socket(plan.source, address)
                            try:
                                err = sock.connect_ex((address, port))
                                if err == errno.EINPROGRESS:  # writable once connected: cheaper than sock_connect
                                    fd = sock.fileno()
                                    ready = self._loop.create_future()
                                    self._loop.add_writer(fd, ready.set_result, None)
                                    try:
                                        await ready
                                    finally:
                                        self._loop.remove_writer(fd)
                                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                                if err:
                                    raise OSError(err, os.strerror(err))
                                # (the loop sets TCP_NODELAY)
                                _, protocol = await self._loop.create_connection(factory, sock=sock)
                            except BaseException:
                                sock.close()
                                raise
                        protocol.remote = address
                        return protocol
                    except SourceUnavailable:
                        raise
                    except OSError as exc:
                        last = exc
            finally:
                timer.cancel()
        except asyncio.CancelledError:
            if fired:
                task.uncancel()  # withdraw our own request (an outer timeout may have fired too)
            if not fired or task.cancelling():
                raise  # cancelled by someone else as well: theirs to handle (asyncio.timeout counts)
            raise UpstreamTimeout(f"connect to {_show(addresses, port)} timed out after {timeout:g}s") from None
        if isinstance(last, UpstreamError):
            raise last
        if isinstance(last, ConnectionRefusedError):
            raise ConnectRefused(f"connection to {_show(addresses, port)} refused") from None
        code = getattr(last, "errno", None)
        if code in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            raise UpstreamError(f"{_show(addresses, port)} unreachable: {last}", reason="unreachable",
                                proxy_status="destination_ip_unroutable") from None
        raise UpstreamError(f"cannot connect to {_show(addresses, port)}: {last}", reason="connect_failed",
                            proxy_status="destination_unavailable") from None


def _bound_socket(source: str, address: str) -> _socket.socket:
    """A non-blocking TCP socket bound to ``source`` (the kernel picks the port at connect time:
    ``IP_BIND_ADDRESS_NO_PORT``); ``SourceUnavailable`` when the host no longer has ``source``.
    The C socket type itself (``socket.socket`` is its Python subclass): the loop reads its
    family and type as plain ints, where the subclass builds an enum member for each."""
    sock = _socket.socket(_family(address), socket.SOCK_STREAM | socket.SOCK_NONBLOCK)  # (no ioctl)
    try:
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        except OSError:
            pass
        sock.bind((source, 0))
    except OSError as exc:
        sock.close()
        raise SourceUnavailable(f"cannot use source address {source}: {exc.strerror}") from None
    return sock


def _show(addresses: list[str], port: int) -> str:
    shown = [f"[{a}]" if ":" in a else a for a in addresses[:3]]
    return f"{'/'.join(shown)}:{port}"
