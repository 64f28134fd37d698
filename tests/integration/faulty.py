"""Loopback peers that misbehave, for the fault-injection suite (test_faults.py).

``FaultyServer`` accepts connections on 127.0.0.1 and runs a *behaviour* per connection in a
thread (one request per connection: a complete response says ``Connection: close``, so the
gateway never reuses a connection whose peer is only watching); afterwards it keeps reading until the gateway closes the connection, and records how
that ended (``Peer.closed`` / ``Peer.ended_by``), so a test can check that the side still
there was closed. ``FaultyOrigin`` picks the behaviour from the request path (``/reset``,
``/silent``, ``/trickle-head`` ... see ``ROUTES``). ``Blackhole`` is a listener whose accept
queue is full, so connects to it hang. Client-side helpers read one response and send RSTs.

Nothing here is a mock: every byte crosses a real socket.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

from .peers import Acceptor, pattern_bytes

TRICKLE_INTERVAL = 0.2  # seconds between bytes of a trickling peer


def rst_close(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends a RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def peer_gone(sock: socket.socket) -> bool:
    """True when the other end has closed (EOF or reset) -- without consuming data."""
    try:
        r, _, _ = select.select([sock], [], [], 0)
        if not r:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class Peer:
    """One accepted connection of a FaultyServer."""

    def __init__(self, sock: socket.socket, addr: tuple) -> None:
        self.sock = sock
        self.addr = addr
        self.head = b""
        self.path = ""
        self.content_length = 0
        self.body_received = 0
        self.sent = 0
        self.closed = threading.Event()
        self.ended_by = ""  # "eof", "reset", "self" (the behaviour closed it), "timeout"
        self.closed_at = 0.0

    def read_head(self) -> bytes:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("peer closed before a complete head")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        self.head = head
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        self.path = parts[1].decode("latin-1") if len(parts) > 1 else ""
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                self.content_length = int(v)
        self.body_received = len(rest)
        return rest

    def peek_path(self) -> str | None:
        """The request line's path, its query left out ("/" when it has none), peeked at: the
        behaviour then reads the head itself. None when the gateway closed first."""
        data = b""
        while b"\r\n" not in data:
            data = self.sock.recv(4096, socket.MSG_PEEK)
            if not data:
                return None
            if b"\r\n" not in data:
                time.sleep(0.005)
        path = data.split(b" ", 2)[1].decode("latin-1") if data.count(b" ") >= 2 else "/"
        return path.split("?", 1)[0]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def trickle(self, data: bytes, interval: float = TRICKLE_INTERVAL) -> bool:
        """Send one byte per ``interval``; stop (False) as soon as the other end is gone."""
        for i in range(len(data)):
            if peer_gone(self.sock):
                return False
            try:
                self.send(data[i:i + 1])
            except OSError:
                return False
            time.sleep(interval)
        return True


Behaviour = Callable[[Peer], str | None]  # returns "self" when it closed the socket itself


class FaultyServer(Acceptor):
    """A TCP listener on 127.0.0.1 running ``behaviour(peer)`` for every connection."""

    def __init__(self, behaviour: Behaviour, host: str = "127.0.0.1", watch_timeout: float = 20.0) -> None:
        self.behaviour = behaviour
        self.peers: list[Peer] = []
        self.watch_timeout = watch_timeout
        super().__init__(host, backlog=128)

    def url(self, path: str) -> str:
        return f"http://{self.address}{path}"

    def accepted(self, conn: socket.socket, addr: tuple) -> None:
        conn.settimeout(None)
        peer = Peer(conn, addr)
        self.peers.append(peer)
        threading.Thread(target=self._run, args=(peer,), daemon=True).start()

    def _run(self, peer: Peer) -> None:
        how = None
        try:
            how = self.behaviour(peer)
        except OSError:
            pass
        if how == "self":
            peer.ended_by = "self"
        else:
            peer.ended_by = self._watch(peer.sock, peer)
            with contextlib.suppress(OSError):
                peer.sock.close()
        peer.closed_at = time.monotonic()
        peer.closed.set()

    def _watch(self, sock: socket.socket, peer: Peer) -> str:
        """Read (and count) until the gateway closes; how it ended."""
        sock.settimeout(0.1)
        deadline = time.monotonic() + self.watch_timeout
        while not self._stop and time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return "reset"
            if not data:
                return "eof"
            peer.body_received += len(data)
        return "timeout"

    def wait_peers(self, n: int, timeout: float = 5.0) -> list[Peer]:
        deadline = time.monotonic() + timeout
        while len(self.peers) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.peers) >= n, f"{len(self.peers)} connections reached {self.address}, wanted {n}"
        return self.peers[:n]

    def close(self) -> None:
        super().close()
        for p in self.peers:
            with contextlib.suppress(OSError):
                p.sock.shutdown(socket.SHUT_RDWR)


# ------------------------------------------------------------------------------- an origin

BIG = 200 * 1024 * 1024  # announced length of responses that are never finished


def _reset_before_head(p: Peer) -> str:
    p.read_head()
    rst_close(p.sock)
    return "self"


def _reset_mid_body(p: Peer) -> str:
    p.read_head()
    p.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % 1_000_000)
    p.send(next(pattern_bytes(65536)))
    time.sleep(0.05)
    rst_close(p.sock)
    return "self"


def _silent(p: Peer) -> None:
    p.read_head()  # and never answer


def _half_close(p: Peer) -> None:
    p.read_head()
    p.sock.shutdown(socket.SHUT_WR)  # EOF to the gateway; we keep reading


def _half_close_mid_body(p: Peer) -> None:
    p.read_head()
    p.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
    p.sock.shutdown(socket.SHUT_WR)


def _trickle_head(p: Peer) -> None:
    p.read_head()
    p.trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


TRICKLE_BODY = b"abcde"


def _trickle_body(p: Peer) -> None:
    p.read_head()
    p.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(TRICKLE_BODY))
    p.trickle(TRICKLE_BODY)


def _bad_status(p: Peer) -> None:
    p.read_head()
    p.send(b"HTTP/1.1 2O0 Okay-ish\r\nContent-Length: 2\r\n\r\nok")


def _two_lengths(p: Peer) -> None:
    p.read_head()
    p.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!")


SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nX-Smuggled: 1\r\n\r\nsmuggled!"


def _two_responses(p: Peer) -> None:
    """Answers one request with two responses in one packet: the second was never asked for."""
    p.read_head()
    p.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nfirst\n" + SMUGGLED)


def _interim_with_body(p: Peer) -> None:
    """A non-standard 1xx status that claims a body, then the real response."""
    p.read_head()
    p.send(b"HTTP/1.1 190 Odd\r\nContent-Length: 9\r\n\r\ninjected!HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
           b"Connection: close\r\n\r\nreal\n")


def _stream(p: Peer) -> None:
    """An endless download (announced as 200 MiB), 64 KiB at a time, until the gateway hangs up."""
    p.read_head()
    p.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
    block = next(pattern_bytes(65536))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        p.send(block)
        time.sleep(0.002)


def _sink(p: Peer) -> None:
    """Read the request body (counted by the watcher); answer only if it is complete."""
    p.read_head()
    p.sock.settimeout(0.1)
    deadline = time.monotonic() + 20
    while p.body_received < p.content_length and time.monotonic() < deadline:
        try:
            data = p.sock.recv(65536)
        except TimeoutError:
            continue
        if not data:
            return
        p.body_received += len(data)
    if p.body_received >= p.content_length:
        p.send(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nyes")


def _ok(p: Peer) -> None:
    p.read_head()
    p.send(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")


ROUTES: dict[str, Behaviour] = {
    "/reset-before-head": _reset_before_head,
    "/reset-mid-body": _reset_mid_body,
    "/silent": _silent,
    "/half-close": _half_close,
    "/half-close-mid-body": _half_close_mid_body,
    "/trickle-head": _trickle_head,
    "/trickle-body": _trickle_body,
    "/bad-status": _bad_status,
    "/two-lengths": _two_lengths,
    "/two-responses": _two_responses,
    "/interim-with-body": _interim_with_body,
    "/stream": _stream,
    "/sink": _sink,
    "/ok": _ok,
}


class FaultyOrigin(FaultyServer):
    """An HTTP/1.1 origin that misbehaves as its request path says (see ``ROUTES``)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(self._dispatch, host)

    @staticmethod
    def _dispatch(p: Peer) -> str | None:
        path = p.peek_path()
        return None if path is None else ROUTES.get(path, _ok)(p)

    def requests_to(self, path: str) -> list[Peer]:
        return [p for p in self.peers if p.path.split("?", 1)[0] == path]


def echo_behaviour(p: Peer) -> None:
    """Echo until EOF (the watcher then records how the gateway ended the connection)."""
    p.sock.settimeout(20)
    while True:
        data = p.sock.recv(65536)
        if not data:
            p.ended_by = "eof"
            return
        p.body_received += len(data)
        p.send(data)


class Blackhole:
    """A listener whose accept queue is full: further connects hang (SYNs are dropped)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.fillers = []
        for _ in range(4):
            f = socket.socket()
            f.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                f.connect(("127.0.0.1", self.port))
            self.fillers.append(f)
        # The queue (backlog 0: one connection) is full once a filler's handshake completed.
        _, writable, _ = select.select([], self.fillers, [], 10)
        if not any(f.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 for f in writable):
            raise RuntimeError("no connection completed to the blackhole listener: its queue is not full")

    def close(self) -> None:
        for f in self.fillers:
            f.close()
        self.sock.close()


# ------------------------------------------------------------------------------ client side

class Response:
    """One HTTP response read off a socket, tolerant of a body cut short."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        head, sep, self.body = raw.partition(b"\r\n\r\n")
        self.complete_head = bool(sep)
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        self.headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            self.headers.setdefault(k.strip().lower(), v.strip())

    def header(self, name: str) -> str | None:
        v = self.headers.get(name.lower().encode())
        return v.decode("latin-1") if v is not None else None

    @property
    def proxy_status_error(self) -> str | None:
        ps = self.header("Proxy-Status")
        if ps is None or not ps.startswith("egressgate;"):
            return None
        for item in ps.split(";")[1:]:
            k, _, v = item.strip().partition("=")
            if k == "error":
                return v
        return None

    def __repr__(self) -> str:
        return f"Response({self.raw[:300]!r})"


def read_until_close(sock: socket.socket, timeout: float = 5.0, limit: int = 1 << 26) -> tuple[bytes, str]:
    """Read until the other end closes, for at most ``timeout`` seconds in all; returns
    (data, "eof" | "reset" | "timeout" | "limit")."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), "timeout"
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return b"".join(chunks), "timeout"
        except OSError:
            return b"".join(chunks), "reset"
        if not chunk:
            return b"".join(chunks), "eof"
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks), "limit"


def fd_targets(pid: int) -> list[str]:
    """What each open fd of a process points at (for a readable leak report)."""
    out = []
    base = f"/proc/{pid}/fd"
    for name in sorted(os.listdir(base), key=int):
        with contextlib.suppress(OSError):
            out.append(f"{name}->{os.readlink(f'{base}/{name}')}")
    return out


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))
