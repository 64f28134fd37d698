"""Absolute-URI forwarding semantics: keep-alive, pipelining, HTTP/1.0, HEAD, chunked and
close-delimited responses, Expect: 100-continue, upstream connection reuse."""

from __future__ import annotations

import json
import socket
import subprocess

from .conftest import need
from .peers import base_config, connect, pattern_bytes, raw_exchange, read_head


def _read_responses(sock: socket.socket, count: int) -> list[tuple[bytes, bytes]]:
    """Read ``count`` Content-Length-framed responses."""
    buf = b""
    out = []
    while len(out) < count:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, (out, buf)
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.lower() == b"content-length":
                length = int(v)
        while len(buf) < length:
            buf += sock.recv(65536)
        out.append((head, buf[:length]))
        buf = buf[length:]
    return out


def test_pipelined_requests_answered_in_order(start_gateway, origin):
    gw = start_gateway(base_config())
    with socket.create_connection((gw.host, gw.port), timeout=10) as s:
        s.sendall(b"".join(f"GET {origin.url(f'/p{i}')} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(5)))
        responses = _read_responses(s, 5)
    assert [body for _, body in responses] == [f"hello /p{i}\n".encode() for i in range(5)]
    assert all(b"Connection: keep-alive" in head for head, _ in responses)


def test_keep_alive_reuses_upstream_connection(start_gateway, origin):
    gw = start_gateway(base_config())
    peers = set()
    for _ in range(2):  # two client connections, one after the other
        with socket.create_connection((gw.host, gw.port), timeout=10) as s:
            for _ in range(3):
                s.sendall(f"GET {origin.url('/peer')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                peers.add(_read_responses(s, 1)[0][1])
    assert len(peers) == 1, f"the origin saw several connections: {peers}"


def test_http10_client(start_gateway, origin):
    gw = start_gateway(base_config())
    # raw_exchange reads until the gateway closes, and fails if it does not within its bound
    resp = raw_exchange(gw.address, f"GET {origin.url('/old')} HTTP/1.0\r\n\r\n".encode())
    assert resp.startswith(b"HTTP/1.1 200 ")
    assert b"Connection: close" in resp
    assert resp.endswith(b"hello /old\n")
    # HTTP/1.0 client, chunked origin response: de-chunked, delimited by the gateway's close
    resp = raw_exchange(gw.address, f"GET {origin.url('/bytes?n=1000&mode=chunked')} HTTP/1.0\r\n\r\n".encode())
    head, _, body = resp.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower() and b"content-length" not in head.lower(), head
    assert body == b"".join(pattern_bytes(1000))


def test_head_request(start_gateway, origin):
    gw = start_gateway(base_config())
    with socket.create_connection((gw.host, gw.port), timeout=10) as s:
        s.sendall(f"HEAD {origin.url('/bytes?n=5000')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        s.sendall(f"GET {origin.url('/after-head')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        buf = b""
        while b"hello /after-head\n" not in buf:
            chunk = s.recv(65536)
            assert chunk
            buf += chunk
    first, _, rest = buf.partition(b"\r\n\r\n")
    assert b"Content-Length: 5000" in first
    assert rest.startswith(b"HTTP/1.1 200")  # no body bytes after the HEAD response


def test_close_delimited_response_rechunked_for_http11(start_gateway, origin):
    gw = start_gateway(base_config())
    with socket.create_connection((gw.host, gw.port), timeout=10) as s:
        s.sendall(f"GET {origin.url('/bytes?n=70000&mode=close')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        buf = b""
        while not buf.endswith(b"0\r\n\r\n"):
            chunk = s.recv(65536)
            assert chunk
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        assert b"Transfer-Encoding: chunked" in head
        # the client connection is still usable
        s.sendall(f"GET {origin.url('/again')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert _read_responses(s, 1)[0][1] == b"hello /again\n"


def test_expect_100_continue_interim_response_is_relayed(start_gateway, origin):
    gw = start_gateway(base_config())
    body = b"z" * 100_000
    with connect(gw.address, timeout=10) as s:
        s.sendall(f"POST {origin.url('/upload')} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                  f"Expect: 100-continue\r\n\r\n".encode())
        # the client holds the body back until the origin's 100 Continue reaches it
        interim = read_head(s, 10)
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        s.sendall(body)
        final = _read_responses(s, 1)[0]
    assert final[0].startswith(b"HTTP/1.1 200 "), final
    assert json.loads(final[1])["bytes"] == len(body)


def test_chunked_upload_and_expect_continue_with_curl(start_gateway, origin):
    gw = start_gateway(base_config())
    payload = b"z" * 300_000
    # curl would send the body after 1 s without the 100; make it wait far longer, and check
    # that it saw the interim response
    r = subprocess.run([need("curl"), "-sS", "-v", "--expect100-timeout", "30", "-x", gw.url,
                        "-H", "Transfer-Encoding: chunked", "-H", "Expect: 100-continue", "--data-binary", "@-",
                        origin.url("/upload")], input=payload, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert b"< HTTP/1.1 100 Continue" in r.stderr, r.stderr[-2000:]
    assert b'"bytes": 300000' in r.stdout


def test_client_disconnect_mid_download_is_logged(start_gateway, origin):
    gw = start_gateway(base_config())
    s = socket.create_connection((gw.host, gw.port), timeout=10)
    s.sendall(f"GET {origin.url('/bytes?n=50000000&delay=0.001')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert s.recv(1000)
    s.close()
    rec = gw.wait_log(lambda r: "/bytes" in r["target"])
    # closing with unread data sends a reset, so either is right; an empty reason is not
    assert rec["status"] == 499 and rec["reason"] in ("client_closed", "client_reset"), rec
    assert rec["bytes_down"] < 50_000_000


def test_client_disconnect_mid_download_on_reused_connection_is_logged(start_gateway, origin):
    gw = start_gateway(base_config())
    s = socket.create_connection((gw.host, gw.port), timeout=10)
    s.sendall(f"GET {origin.url('/warm')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert _read_responses(s, 1)[0][1] == b"hello /warm\n"
    gw.wait_log(lambda r: r["target"].endswith("/warm"))  # its upstream connection is back in the pool
    s.sendall(f"GET {origin.url('/bytes?n=50000000&delay=0.001')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert s.recv(1000)
    s.close()
    rec = gw.wait_log(lambda r: "/bytes" in r["target"], timeout=5)
    assert rec["status"] == 499 and rec["reason"] in ("client_closed", "client_reset"), rec


def test_whoami(start_gateway):
    gw = start_gateway(base_config())
    resp = raw_exchange(gw.address, b"GET http://egressgate.whoami/ HTTP/1.1\r\nHost: egressgate.whoami\r\n\r\n",
                        read_until_close=False)
    doc = json.loads(resp.partition(b"\r\n\r\n")[2])
    assert doc["client"] == "local" and doc["profile"] == "default"
    assert doc["egress"] == {"kind": "direct"}
