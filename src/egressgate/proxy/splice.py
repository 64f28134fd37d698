"""Zero-copy relay for bulk tunnels: ``splice(2)`` socket -> pipe -> socket, so tunnel bytes
never enter user space (Linux only).

A tunnel starts in copy mode (``data_received`` -> ``transport.write``), which costs nothing
while the tunnel is idle. When one read brings a large chunk, the tunnel is bulk: both
transports are paused and their sockets (duplicated descriptors) are driven by readers and
writers on the loop, each direction through its own pipe. Back-pressure is the pipe: a
direction stops reading its source while the pipe cannot drain into the destination.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
from collections.abc import Callable

AVAILABLE = hasattr(os, "splice") and hasattr(os, "pipe2")
CHUNK = 1 << 20
_F_SETPIPE_SZ = 1031
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_MAX_ROUNDS = 8  # reads per readiness event, so one busy tunnel cannot starve the loop


class Pump:
    """One direction: ``src`` socket -> pipe -> ``dst`` socket."""

    __slots__ = ("loop", "src", "dst", "r", "w", "pending", "count", "eof", "on_eof", "on_error", "on_bytes",
                 "closed", "on_crash")

    def __init__(self, loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket,
                 on_bytes: Callable[[int], None], on_eof: Callable[[], None],
                 on_error: Callable[[str], None], on_crash: Callable[[BaseException], None]) -> None:
        self.loop = loop
        self.src = src
        self.dst = dst
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, _F_SETPIPE_SZ, CHUNK)
        except OSError:
            pass
        self.pending = 0
        self.count = 0
        self.eof = False
        self.closed = False
        self.on_bytes = on_bytes
        self.on_eof = on_eof
        self.on_error = on_error
        self.on_crash = on_crash  # a bug in a callback: the owner closes everything

    def start(self) -> None:
        self.loop.add_reader(self.src.fileno(), self.readable)

    def readable(self) -> None:
        if self.closed:  # a callback the loop had already scheduled when the tunnel ended
            return
        try:
            self._readable()
        except Exception as exc:  # a reader callback must never raise into the loop (it would repeat)
            self.close()
            self.on_crash(exc)

    def _readable(self) -> None:
        src, w = self.src.fileno(), self.w
        for _ in range(_MAX_ROUNDS):
            try:
                n = os.splice(src, w, CHUNK, flags=_FLAGS)
            except BlockingIOError:
                return
            except OSError as exc:
                self.on_error(exc.strerror or "splice failed")
                return
            if n == 0:
                self.loop.remove_reader(src)
                self.eof = True
                self._finish_eof()
                return
            self.count += n
            self.pending += n
            self.on_bytes(n)
            if not self._drain():
                if self.closed:  # the drain failed and its error ended the tunnel (sockets closed)
                    return
                self.loop.remove_reader(src)
                self.loop.add_writer(self.dst.fileno(), self.writable)
                return

    def writable(self) -> None:
        if self.closed:
            return
        try:
            self._writable()
        except Exception as exc:
            self.close()
            self.on_crash(exc)

    def _writable(self) -> None:
        if self._drain() and not self.closed:
            dst = self.dst.fileno()
            self.loop.remove_writer(dst)
            if not self.eof:
                self.loop.add_reader(self.src.fileno(), self.readable)

    def _drain(self) -> bool:
        dst, r = self.dst.fileno(), self.r
        while self.pending:
            try:
                m = os.splice(r, dst, self.pending, flags=_FLAGS)
            except BlockingIOError:
                return False
            except OSError as exc:
                self.on_error(exc.strerror or "splice failed")
                return False
            self.pending -= m
        return True

    def _finish_eof(self) -> None:
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.on_eof()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd, remove in ((self.src, self.loop.remove_reader), (self.dst, self.loop.remove_writer)):
            try:
                remove(fd.fileno())
            except (OSError, ValueError):
                pass
        os.close(self.r)
        os.close(self.w)


def duplicate(transport: asyncio.Transport) -> socket.socket | None:
    """A socket object on a duplicate of the transport's descriptor (plain TCP only)."""
    if transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        return socket.socket(fileno=os.dup(sock.fileno()))
    except OSError:
        return None
