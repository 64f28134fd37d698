"""CONNECT tunnels: byte-exact transfer in bounded memory, half-close both ways, early data,
IPv6 literals, idle timeout."""

from __future__ import annotations

import hashlib
import socket
import time

import pytest

from .. import required
from .peers import base_config, open_tunnel, pattern_sha256


def _gw(start_gateway, *ports, **extra):
    return start_gateway(base_config(security={"connect_ports": list(ports)}, **extra))


def test_half_close_client_first(start_gateway, echo):
    gw = _gw(start_gateway, echo.port)
    s = open_tunnel(gw, f"127.0.0.1:{echo.port}", timeout=20)
    s.sendall(b"ping-1 ")
    s.sendall(b"ping-2")
    s.shutdown(socket.SHUT_WR)  # our EOF must reach the echo server, which then echoes and closes
    got = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    s.close()
    assert got == b"ping-1 ping-2"
    rec = gw.wait_log(lambda r: r["method"] == "CONNECT")
    assert rec["bytes_up"] == 13 and rec["bytes_down"] == 13


def test_half_close_server_first(start_gateway):
    # The origin speaks, closes its write side, and still reads what we send afterwards.
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    gw = _gw(start_gateway, port)
    s = open_tunnel(gw, f"127.0.0.1:{port}", timeout=20)
    conn, _ = lsock.accept()
    conn.sendall(b"banner")
    conn.shutdown(socket.SHUT_WR)
    assert s.recv(100) == b"banner"
    assert s.recv(100) == b""  # EOF passed through
    s.sendall(b"late data after server EOF")
    conn.settimeout(5)
    assert conn.recv(100) == b"late data after server EOF"
    s.close()
    assert conn.recv(100) == b""
    conn.close()
    lsock.close()


def test_early_data_after_connect_head(start_gateway, echo):
    gw = _gw(start_gateway, echo.port)
    s = open_tunnel(gw, f"127.0.0.1:{echo.port}", early=b"sent-before-200", timeout=20)
    got = b""
    while len(got) < 15:
        got += s.recv(100)
    assert got == b"sent-before-200"
    s.close()


def test_ipv6_literal(start_gateway):
    lsock = required.ipv6_loopback()
    port = lsock.getsockname()[1]
    gw = _gw(start_gateway, port)
    s = open_tunnel(gw, f"[::1]:{port}", timeout=20)
    conn, addr = lsock.accept()
    s.sendall(b"v6")
    assert conn.recv(10) == b"v6"
    conn.close()
    s.close()
    lsock.close()


def test_256mib_tunnel_bounded_memory(start_gateway, origin):
    gw = _gw(start_gateway, origin.port)
    rss_before = gw.rss_kib()
    n = 256 * 1024 * 1024
    s = open_tunnel(gw, f"127.0.0.1:{origin.port}", timeout=20)
    s.sendall(f"GET /bytes?n={n} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    head = b""
    body = 0
    peak = 0
    while True:
        k = s.recv_into(buf)
        if not k:
            break
        data = bytes(buf[:k])
        if not head or b"\r\n\r\n" not in head:
            head += data
            if b"\r\n\r\n" in head:
                head, _, data = head.partition(b"\r\n\r\n")
                head += b"\r\n\r\n"
            else:
                continue
        h.update(data)
        body += len(data)
        if body % (32 << 20) < k:
            peak = max(peak, gw.rss_kib())
    s.close()
    assert body == n and h.hexdigest() == pattern_sha256(n)
    peak = max(peak, gw.rss_kib())
    assert peak - rss_before < 48 * 1024, f"RSS grew {peak - rss_before} KiB for a 256 MiB tunnel"


def test_256mib_plain_forwarding_bounded_memory(start_gateway, origin):
    import requests

    gw = _gw(start_gateway)
    rss_before = gw.rss_kib()
    n = 256 * 1024 * 1024
    h = hashlib.sha256()
    peak = 0
    with requests.get(origin.url(f"/bytes?n={n}"), proxies={"http": gw.url}, stream=True, timeout=60) as r:
        assert r.status_code == 200
        for i, chunk in enumerate(r.iter_content(1 << 20)):
            h.update(chunk)
            if i % 32 == 0:
                peak = max(peak, gw.rss_kib())
    assert h.hexdigest() == pattern_sha256(n)
    assert peak - rss_before < 48 * 1024, f"RSS grew {peak - rss_before} KiB"


def test_idle_tunnel_is_closed(start_gateway, echo):
    gw = _gw(start_gateway, echo.port, timeouts={"tunnel_idle": "500ms"})
    s = open_tunnel(gw, f"127.0.0.1:{echo.port}", timeout=20)
    s.settimeout(15)  # a bound for "closed at all", not a measurement: tunnel_idle is 500 ms
    assert s.recv(10) == b""
    rec = gw.wait_log(lambda r: r["method"] == "CONNECT")
    assert rec["reason"] == "idle_timeout"


def test_bulk_tunnel_splice_half_close_and_no_fd_leak(start_gateway, echo):
    """Bulk data switches the tunnel to splice; EOF still propagates and nothing leaks."""
    import threading

    gw = _gw(start_gateway, echo.port)
    fds_before = gw.fd_count()
    s = open_tunnel(gw, f"127.0.0.1:{echo.port}", timeout=20)
    payload = bytes(range(256)) * (32 * 1024)  # 8 MiB
    received = bytearray()

    def reader():
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                return
            received.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    t.join(30)
    s.close()
    assert bytes(received) == payload
    rec = gw.wait_log(lambda r: r["method"] == "CONNECT")
    assert rec["bytes_up"] == len(payload) and rec["bytes_down"] == len(payload)
    deadline = time.monotonic() + 5
    while gw.fd_count() > fds_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.fd_count() <= fds_before
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    metrics = opener.open(gw.admin + "/metrics", timeout=5).read()
    assert b"egressgate_tunnels_spliced_total 1.0" in metrics


class _SpeaksFirst:
    """Sends ``banner`` at once on accept (as SSH, SMTP or a database do: before the gateway's
    next turn), then echoes, or (``then_close``) closes its side: a service refusing by closing,
    or one that says its piece and leaves."""

    def __init__(self, banner: bytes, then_close: bool = False) -> None:
        import threading

        self.banner, self.then_close = banner, then_close
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                conn.sendall(self.banner)  # at once, from the accepting thread
            except OSError:
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                if self.then_close:
                    conn.shutdown(socket.SHUT_WR)
                    conn.recv(100)  # (the tunnel's EOF, or its reset)
                    return
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("banner", [b"", b"421 too busy\r\n"], ids=["silent", "banner"])
@pytest.mark.parametrize("bound", [False, True], ids=["direct", "bound"])
def test_server_that_closes_before_the_tunnel_is_up(start_gateway, banner, bound):
    # The server's EOF can arrive before the tunnel is attached to its upstream connection: it is
    # kept and delivered after the 200 (and the banner), so the client sees the end at once
    # instead of a tunnel that stays open until tunnel_idle.
    server = _SpeaksFirst(banner, then_close=True)
    try:
        extra = {"egress": {"default": {"bind": ["127.0.0.2"]}}} if bound else {}
        gw = _gw(start_gateway, server.port, **extra)
        for _ in range(30):
            s = open_tunnel(gw, f"127.0.0.1:{server.port}", timeout=20)
            s.settimeout(10)  # a hang fails here, long before tunnel_idle (900 s)
            got = b""
            while chunk := s.recv(100):
                got += chunk
            assert got == banner
            s.close()
        rec = gw.wait_log(lambda r: r["method"] == "CONNECT" and r["status"] == 200)
        assert rec["bytes_down"] == len(banner)
    finally:
        server.close()


def test_server_that_speaks_first(start_gateway):
    # The banner can arrive before the tunnel is attached to its upstream connection: it is
    # held and delivered after the 200, never taken for an idle connection's stray bytes.
    banner = _SpeaksFirst(b"SSH-2.0-banner\r\n")
    try:
        gw = _gw(start_gateway, banner.port)
        for _ in range(20):
            s = open_tunnel(gw, f"127.0.0.1:{banner.port}", timeout=20)
            got = b""
            while len(got) < 16:
                chunk = s.recv(100)
                assert chunk, got
                got += chunk
            assert got == b"SSH-2.0-banner\r\n"
            s.sendall(b"hello")
            assert s.recv(100) == b"hello"
            s.close()
    finally:
        banner.close()
