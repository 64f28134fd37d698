"""``Upstream``: the protocol of one outbound connection, and ``UpstreamPool``, idle
persistent connections to origins kept for reuse by plain-HTTP requests.

An ``Upstream`` has an owner (a ``Tunnel`` or an ``Exchange``) that receives its events; in
the pool it has none and any byte or EOF from the far end retires it. A connection dialed
for a tunnel (``hold_early``) instead keeps what a server that speaks first (SSH, SMTP, a
database) sends before the tunnel is attached, and stops reading until then (``take_early``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class Upstream(asyncio.Protocol):
    __slots__ = ("transport", "owner", "key", "remote", "local", "idle_since", "closed", "_on_data", "parser",
                 "on_orphan_crash", "early", "early_end")

    def __init__(self, on_orphan_crash: Callable[[str, BaseException], None] | None = None,
                 hold_early: bool = False) -> None:
        self.on_orphan_crash = on_orphan_crash  # counts and logs a bug when no owner is attached
        self.transport: asyncio.Transport | None = None
        self.owner: Any = None
        self.key: tuple | None = None
        self.remote = "-"
        self.local = "-"
        self.idle_since = 0.0
        self.closed = False
        self._on_data: Callable[[bytes], None] | None = None
        self.parser = None  # the response parser, reused across keep-alive responses
        self.early: bytes | None = b"" if hold_early else None  # bytes before a tunnel took it
        # ... and how the server left meanwhile, if it did: (eof, reset or None), for the tunnel
        self.early_end: tuple[bool, Exception | None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        try:
            sockname = transport.get_extra_info("sockname")
            if sockname:
                self.local = sockname[0]
        except Exception as exc:
            self._crashed("upstream_connection_made", exc)

    def attach(self, owner: Any) -> None:
        """Hand this connection to a tunnel or exchange (owner.upstream_data/eof/lost...)."""
        self.owner = owner
        self._on_data = owner.upstream_data

    def take_early(self) -> bytes:
        """What the server sent before its tunnel was attached; reading resumes. Called right
        before the tunnel takes the connection, with no await in between."""
        data, self.early = self.early or b"", None
        if data and not self.transport.is_closing():
            self.transport.resume_reading()
        return data

    def detach(self) -> None:
        self.owner = None
        self._on_data = None

    # Each callback hands a bug to its owner (``owner.crashed``), which closes the client side
    # too; nothing escapes into the event loop.
    def data_received(self, data: bytes) -> None:
        try:
            on_data = self._on_data
            if on_data is not None:
                on_data(data)
            elif self.early is not None:  # a server that speaks first, before its tunnel is up
                self.early += data
                self.transport.pause_reading()
            else:
                self.transport.close()  # unsolicited bytes on an idle connection: retire it
        except Exception as exc:
            self._crashed("upstream_data_received", exc)

    def eof_received(self) -> bool | None:
        try:
            if self.owner is not None:
                return self.owner.upstream_eof()
            if self.early is not None:  # the server is done before its tunnel is up: kept for it
                self.early_end = (True, None)
                return True  # (half-closed: the tunnel may still send)
        except Exception as exc:
            self._crashed("upstream_eof_received", exc)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        try:
            if self.owner is not None:
                self.owner.upstream_lost(exc)
            elif self.early is not None:
                self.early_end = (False, exc)
        except Exception as bug:
            self._crashed("upstream_connection_lost", bug)

    def pause_writing(self) -> None:
        try:
            if self.owner is not None:
                self.owner.upstream_pause_writing()
        except Exception as exc:
            self._crashed("upstream_pause_writing", exc)

    def resume_writing(self) -> None:
        try:
            if self.owner is not None:
                self.owner.upstream_resume_writing()
        except Exception as exc:
            self._crashed("upstream_resume_writing", exc)

    def _crashed(self, where: str, exc: BaseException) -> None:
        owner = self.owner
        self.detach()
        if self.transport is not None:
            self.transport.abort()
        if owner is not None:
            owner.crashed(where, exc)
        elif self.on_orphan_crash is not None:
            self.on_orphan_crash(where, exc)


class UpstreamPool:
    """Idle keep-alive connections by (egress plan key, address, port)."""

    def __init__(self, max_per_key: int = 256, max_total: int = 4096) -> None:
        self._idle: dict[tuple, list[Upstream]] = {}
        self._count = 0
        self.max_per_key = max_per_key
        self.max_total = max_total

    def take(self, key: tuple) -> Upstream | None:
        stack = self._idle.get(key)
        while stack:
            up = stack.pop()
            self._count -= 1
            if not up.closed and not up.transport.is_closing():
                return up
        return None

    def put(self, up: Upstream, key: tuple, now: float) -> None:
        """Keep ``up`` for reuse if it is idle, readable and fully consumed; else close it. A
        connection whose reads were paused (its client did not read) would never notice the
        origin closing it, nor bytes it should not send: it is closed, not pooled."""
        up.detach()
        if up.closed or up.transport.is_closing():
            return
        if not up.transport.is_reading() or up.transport.get_write_buffer_size():
            up.transport.close()  # (paused by its client, or request bytes still unsent)
            return
        stack = self._idle.setdefault(key, [])
        if len(stack) >= self.max_per_key or self._count >= self.max_total:
            up.transport.close()
            return
        up.key = key
        up.idle_since = now
        stack.append(up)
        self._count += 1

    def sweep(self, now: float, idle_timeout: float) -> None:
        for key in list(self._idle):
            stack = self._idle[key]
            keep = [u for u in stack if not u.closed and now - u.idle_since < idle_timeout]
            for u in stack:
                if u not in keep and not u.closed:
                    u.transport.close()
            self._count -= len(stack) - len(keep)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def close_all(self) -> None:
        for stack in self._idle.values():
            for u in stack:
                if not u.closed:
                    u.transport.close()
        self._idle.clear()
        self._count = 0

    def __len__(self) -> int:
        return self._count
