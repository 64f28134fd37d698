"""The harness of the playbook tests (``test_playbook.py``): one real ``Gateway`` and its client
connections, driven event by event, with no socket anywhere.

- The gateway is the real one (``proxy.server.Gateway``), its runtime compiled from a YAML
  text by ``app.load_runtime_text``; its sweeper and listeners are never started.
- A client connection is a real ``ClientConnection`` on a ``FakeTransport``: the test calls
  the protocol's callbacks itself (``data_received``, ``eof_received``, ``pause_writing``...).
- Upstream connections are faked at the dialer (``egress.dialer.Dialer``, in ``egress.reach``, the
  one piece of the way out that opens sockets): ``FakeDialer.connect`` makes a real ``Upstream`` protocol on a
  ``FakeTransport`` (or raises a queued error, or waits while the test holds the dial). The
  rest of the connector (routes, pool, retries) is the real code.
- A ``FakeTransport`` records every byte written (``take()``: what came since the last take)
  and every flow call (``calls``: pause_reading, resume_reading, write_eof, close, abort), and,
  like asyncio's, reports ``connection_lost`` to its protocol on the next loop turn after a
  close (once its write buffer is empty) or an abort.
- Access records are copied as they are written (``RecordingLog``); bugs caught by the
  gateway (``internal_error``) or reaching the loop are collected in ``Play.bugs``.

``Play.settle()`` runs the loop for a few turns, enough for what is already due (a dial's
task, a scheduled ``connection_lost``); timers (linger, flush grace) never fire.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from egressgate.app import load_runtime_text
from egressgate.egress.resolver import Resolver
from egressgate.egress.upstream import Upstream
from egressgate.model import AccessRecord
from egressgate.observe.metrics import Metrics
from egressgate.proxy.listeners import ListenerInfo
from egressgate.proxy.server import Gateway
from egressgate.proxy.session import ClientConnection

LISTENER = "127.0.0.1:3128"
CLIENT_PEER = ("127.0.0.1", 5555)
EGRESS_ADDR = "198.51.100.7"  # the local address of every faked upstream connection

CONFIG = """
listen: [{address: "127.0.0.1:3128"}]
clients:
  - name: local
    from: [127.0.0.0/8]
    deny: ["203.0.113.66"]
security:
  allow_private: [203.0.113.0/24]   # the documentation range stands for public origins here
"""


class FakeTransport(asyncio.Transport):
    """A transport with no socket (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol, peername: tuple,
                 sockname: tuple) -> None:
        super().__init__()
        self.loop = loop
        self.protocol = protocol
        self.extra = {"peername": peername, "sockname": sockname, "socket": None, "sslcontext": None,
                      "peercert": None}
        self.chunks: list[bytes] = []
        self.seen = 0  # bytes already returned by take()
        self.calls: list[str] = []
        self.buffer_size = 0  # what get_write_buffer_size() reports (a test sets it)
        self.half_close = True  # can_write_eof() (False: as TLS)
        self.reading = True
        self.closing = False
        self.eof = False
        self.lost = False
        self.dropped = 0  # bytes written after close: asyncio drops them too

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def take(self) -> bytes:
        """The bytes written since the last ``take``."""
        data = self.data
        new, self.seen = data[self.seen:], len(data)
        return new

    def write(self, data) -> None:
        if self.eof:
            raise RuntimeError("Cannot call write() after write_eof()")  # (as asyncio)
        if self.closing:
            self.dropped += len(data)
        elif data:
            self.chunks.append(bytes(data))

    def writelines(self, list_of_data) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return self.half_close

    def write_eof(self) -> None:
        self.calls.append("write_eof")
        self.eof = True

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")
        self.reading = False

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading and not self.closing

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffer_size

    def get_extra_info(self, name, default=None):
        return self.extra.get(name, default)

    def close(self) -> None:
        if self.closing:
            return
        self.calls.append("close")
        self.closing = True
        if not self.buffer_size:
            self._lose()

    def abort(self) -> None:
        self.calls.append("abort")
        self.closing = True
        self._lose()

    def drained(self) -> None:
        """The peer read everything: the write buffer is empty (a pending close completes)."""
        self.buffer_size = 0
        if self.closing:
            self._lose()

    # --- the peer's events ----------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        self.protocol.data_received(data)

    def receive_eof(self) -> None:
        """The peer half-closed. As asyncio: the transport closes unless the protocol keeps it open."""
        if not self.protocol.eof_received():
            self.close()

    def peer_lost(self, exc: Exception | None = None) -> None:
        """The connection is gone (the peer closed both ways, or reset it)."""
        self.closing = True
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(exc)

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.loop.call_soon(self.protocol.connection_lost, None)


class FakeDialer:
    """Stands in for ``egress.dialer.Dialer`` (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.calls: list[tuple[tuple[str, ...], int]] = []  # (addresses, port) of each dial
        self.failures: list[Exception] = []  # raised by the next dials, in order
        self.upstreams: list[tuple[Upstream, FakeTransport]] = []
        self.gate: asyncio.Future | None = None  # while set and unresolved, dials wait
        # what the server does the moment its connection is made, before the dial's task resumes
        # (called with the new upstream's transport), e.g. ``lambda ut: ut.receive_eof()``
        self.at_once: Callable[[FakeTransport], None] | None = None

    def hold(self) -> None:
        self.gate = self.loop.create_future()

    def release(self) -> None:
        gate, self.gate = self.gate, None
        if not gate.done():  # (a dial cancelled while it waited cancelled the gate too)
            gate.set_result(None)

    async def connect(self, plan, addresses, port, factory, timeout):
        self.calls.append((tuple(addresses), port))
        if self.gate is not None:
            await self.gate
        if self.failures:
            raise self.failures.pop(0)
        up = factory()
        t = FakeTransport(self.loop, up, (addresses[0], port), (EGRESS_ADDR, 40000 + len(self.upstreams)))
        up.connection_made(t)
        self.upstreams.append((up, t))
        if self.at_once is not None:
            self.at_once(t)
        up.remote = addresses[0]
        return up


class RecordingLog:
    """An access log that keeps a copy of each record as it is written."""

    def __init__(self) -> None:
        self.records: list[AccessRecord] = []

    def write(self, rec: AccessRecord) -> None:
        self.records.append(dataclasses.replace(rec))


class Play:
    """One gateway, its fakes, and what they saw."""

    def __init__(self, config: str = CONFIG) -> None:
        self.loop = asyncio.new_event_loop()
        self.bugs: list[str] = []
        self.loop.set_exception_handler(lambda loop, ctx: self.bugs.append(f"loop: {ctx.get('message')}"))
        runtime, _ = load_runtime_text(None, config.encode())
        self.metrics = Metrics()
        self.log = RecordingLog()
        self.gw = Gateway(runtime, self.metrics, self.log, Resolver(), self.loop, ClientConnection)
        counted = self.gw.internal_error

        def internal_error(where: str, exc: BaseException) -> None:
            self.bugs.append(f"{where}: {exc!r}")
            counted(where, exc)

        self.gw.internal_error = internal_error
        self.dialer = FakeDialer(self.loop)
        self.gw.connector.reach.dialer = self.dialer
        self.connects: list[tuple[str, bool, bool]] = []  # (destination, CONNECT, fresh) per Connector.connect
        real_connect = self.gw.connector.connect

        def connect(r, connect: bool, chain_timeout: float, fresh: bool = False):
            self.connects.append((str(r.dest), connect, fresh))
            return real_connect(r, connect, chain_timeout, fresh)

        self.gw.connector.connect = connect
        self.listener = ListenerInfo(LISTENER, False, self.metrics.listener(LISTENER))

    def client(self, peer: tuple = CLIENT_PEER) -> tuple[ClientConnection, FakeTransport]:
        """A new client connection, accepted."""
        conn = ClientConnection(self.gw, self.listener)
        t = FakeTransport(self.loop, conn, peer, ("127.0.0.1", 3128))
        conn.connection_made(t)
        return conn, t

    def upstream(self, i: int = -1) -> tuple[Upstream, FakeTransport]:
        return self.dialer.upstreams[i]

    def settle(self, rounds: int = 20) -> None:
        """Run the loop a few turns: tasks and callbacks already due run; no timer fires."""
        async def spin() -> None:
            for _ in range(rounds):
                await asyncio.sleep(0)

        self.loop.run_until_complete(spin())

    def outcomes(self) -> list[tuple]:
        """Each access record so far: (method, status, reason, bytes_up, bytes_down)."""
        return [(r.method, r.status, r.reason, r.bytes_up, r.bytes_down) for r in self.log.records]

    def gauge(self, name: str) -> float:
        """A per-listener gauge, e.g. ``active_tunnels``, as a scrape would read it."""
        return self.metrics.registry.get_sample_value(f"egressgate_{name}", {"listener": LISTENER})

    def assert_all_closed(self) -> None:
        """Nothing of any connection is left: registry, gauges, per-client counts; every upstream
        connection is closed or idle in the pool (no owner)."""
        assert not self.gw.connections
        assert self.gauge("active_connections") == 0
        assert self.gauge("active_tunnels") == 0
        assert self.gw.limits.per_client == {}
        assert all(t.closing or up.owner is None for up, t in self.dialer.upstreams)

    def close(self) -> None:
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self.settle()
        self.loop.close()
