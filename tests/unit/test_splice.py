"""``proxy.splice.Pump``: a pump whose error callback ends the tunnel (closing the pump and
both sockets, as ``Tunnel.end`` does) must not touch the closed sockets afterwards. Seen under
load as ``internal_error where=splice: ValueError('Invalid file descriptor: -1')``: the drain
into a reset destination failed, the tunnel ended, and the pump then registered a writer on the
closed destination. Real sockets (socketpairs) and a real event loop; no mocks."""

from __future__ import annotations

import asyncio
import socket

import pytest

from egressgate.proxy import splice

pytestmark = pytest.mark.skipif(not splice.AVAILABLE, reason="splice(2) is Linux only")


def test_an_error_that_ends_the_tunnel_leaves_the_closed_sockets_alone() -> None:
    async def run() -> tuple[list[str], list[BaseException]]:
        loop = asyncio.get_running_loop()
        src_peer, src = socket.socketpair()
        dst, dst_peer = socket.socketpair()
        for s in (src, dst):
            s.setblocking(False)
        errors: list[str] = []
        crashes: list[BaseException] = []
        pump: splice.Pump | None = None

        def ended(what: str) -> None:  # as Tunnel._error -> Tunnel.end: the pump and sockets close
            errors.append(what)
            pump.close()
            src.close()
            dst.close()

        pump = splice.Pump(loop, src, dst, lambda n: None, lambda: None, ended, crashes.append)
        dst_peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        dst_peer.close()  # the destination is reset: draining into it fails (EPIPE / ECONNRESET)
        src_peer.sendall(b"x" * 65536)
        pump.start()
        for _ in range(100):
            if errors or crashes:
                break
            await asyncio.sleep(0.01)
        src_peer.close()
        return errors, crashes

    errors, crashes = asyncio.run(run())
    assert errors, "the drain into a reset destination should fail"
    assert crashes == []
