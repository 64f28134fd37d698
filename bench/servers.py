"""Loopback far ends for the benchmark: a bulk sink/source and an echo server.

Run as separate processes by bench/run.py so that their CPU is accounted apart from the proxy's
and the load generator's:

    python bench/servers.py sink --port 40001
    python bench/servers.py echo --ports 40010,40011 [--reuseport]

Each prints one line ``ready`` on stdout once it is listening, then serves until SIGTERM.

Sink/source protocol (one request per connection, used by the CONNECT throughput figure):
    client sends ``UP <n>\\n`` then n bytes; the server reads them all, replies ``OK <n>\\n``.
    client sends ``DOWN <n>\\n``; the server sends n bytes.
Large buffers (1 MiB sendall from one preallocated buffer, recv_into a preallocated buffer) keep the
sink far from being the bottleneck.

Echo: every byte received is written back (used for the tunnel-rate and idle-tunnel figures).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import threading

CHUNK = 1 << 20  # 1 MiB


def _listen(host: str, port: int, reuseport: bool = False, backlog: int = 4096) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    s.listen(backlog)
    return s


def _raise_nofile() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---------------------------------------------------------------------------- sink / source


HEADER = 24  # b"UP 00000000002147483648\n": verb, space, 20 digits, newline


def _read_header(conn: socket.socket) -> bytes:
    buf = b""
    while len(buf) < HEADER:
        chunk = conn.recv(HEADER - len(buf))
        if not chunk:
            raise ConnectionError("eof before request header")
        buf += chunk
    return buf


def _sink_conn(conn: socket.socket) -> None:
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        line = _read_header(conn)
        verb, n_s = line.split()
        n = int(n_s)
        if verb == b"UP":
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            got = 0
            while got < n:
                r = conn.recv_into(view, min(CHUNK, n - got))
                if r == 0:
                    break
                got += r
            conn.sendall(b"OK %d\n" % got)
        elif verb == b"DN":
            payload = memoryview(b"\x5a" * CHUNK)
            left = n
            while left > 0:
                if left >= CHUNK:
                    conn.sendall(payload)
                    left -= CHUNK
                else:
                    conn.sendall(payload[:left])
                    left = 0
        # Wait for the client to close so we never cut the tail of the data with an RST.
        conn.settimeout(30)
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass
    except (OSError, ValueError):
        pass
    finally:
        conn.close()


def serve_sink(host: str, port: int) -> None:
    lsock = _listen(host, port)
    print("ready", flush=True)
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=_sink_conn, args=(conn,), daemon=True).start()


# ---------------------------------------------------------------------------- echo


class _Echo(asyncio.Protocol):
    __slots__ = ("tr",)

    def connection_made(self, transport):  # type: ignore[override]
        self.tr = transport

    def data_received(self, data):  # type: ignore[override]
        self.tr.write(data)

    def eof_received(self):  # type: ignore[override]
        return False  # close our side too


async def _echo_main(host: str, ports: list[int], reuseport: bool) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for p in ports:
        sock = _listen(host, p, reuseport=reuseport)
        servers.append(await loop.create_server(_Echo, sock=sock, backlog=4096))
    print("ready", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    for s in servers:
        s.close()


def serve_echo(host: str, ports: list[int], reuseport: bool) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a project dependency
        pass
    asyncio.run(_echo_main(host, ports, reuseport))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sink")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    e = sub.add_parser("echo")
    e.add_argument("--host", default="127.0.0.1")
    e.add_argument("--ports", required=True, help="comma-separated")
    e.add_argument("--reuseport", action="store_true")
    a = ap.parse_args(argv)
    _raise_nofile()
    if a.cmd == "sink":
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        serve_sink(a.host, a.port)
    else:
        serve_echo(a.host, [int(p) for p in a.ports.split(",")], a.reuseport)
    return 0


if __name__ == "__main__":
    sys.exit(main())
