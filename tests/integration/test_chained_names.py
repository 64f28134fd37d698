"""Chained (upstream) profiles and internal names (issue 25, item 6): a chained proxy resolves
the names it is sent on its own side, where ``localhost`` is its loopback and a single-label
or ``*.svc`` name is completed into its own network. The gateway refuses by name what the
address guard refuses by address (403, ``Proxy-Status: ...; error=destination_ip_prohibited``,
access-log reason ``destination_name_prohibited``), for CONNECT, plain HTTP and SOCKS5, with
curl, requests and raw sockets. The upstream is a loopback proxy that records every request
head it is sent: refused names never reach it; public names, and names the operator exempts
(``security.allow_suffixes``), do; ``security.deny_suffixes`` adds suffixes."""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest
import requests
import socks

from .conftest import curl
from .faulty import Response
from .peers import base_config, raw_exchange


class RecordingProxy:
    """An HTTP proxy on loopback that records the request line of every head it is sent and
    answers each with ``502`` (it reaches nothing: what matters is what it was asked)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.asked: list[str] = []
        self._stop = False
        self.sock.settimeout(0.05)
        self._idle = threading.Event()  # set each time an accept finds nobody waiting
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                self._idle.set()
                continue
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(10)
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                self.asked.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 9\r\nConnection: close\r\n\r\nrecorded\n")
                return

    def seen(self) -> list[str]:
        """Every request line sent so far (connections still queued included: waits until the
        accept loop has found the queue empty once after the call)."""
        self._idle.clear()
        if not self._idle.wait(10):
            raise AssertionError("the recording proxy's accept loop is stuck")
        return list(self.asked)

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def upstream():
    p = RecordingProxy()
    yield p
    p.close()


def _chained(start_gateway, upstream: RecordingProxy, **security):
    return start_gateway(base_config(
        listen=[{"address": "127.0.0.1:0"}, {"address": "127.0.0.2:0", "protocol": "socks5"}],
        egress={"chained": {"upstream": [upstream.url]}},
        clients=[{"name": "job", "from": ["127.0.0.0/8"], "egress": ["chained"]}],
        security={"connect_ports": [443, 8080], **security}))


INTERNAL = ["localhost", "LOCALHOST.", "foo.localhost", "intranet", "db.internal", "printer.local",
            "api.default.svc", "api.default.svc.cluster.local", "nas.home.arpa"]


def _refused(resp: Response) -> None:
    assert resp.status == 403, resp
    assert resp.proxy_status_error == "destination_ip_prohibited", resp


@pytest.mark.parametrize("name", INTERNAL)
def test_internal_names_never_reach_the_chained_proxy(start_gateway, upstream, name):
    gw = _chained(start_gateway, upstream)
    # plain HTTP and CONNECT, raw: the name exactly as spelled
    _refused(Response(raw_exchange(gw.address, f"GET http://{name}:8080/x?k=v HTTP/1.1\r\nHost: {name}:8080\r\n\r\n"
                                   .encode(), read_until_close=False)))
    _refused(Response(raw_exchange(gw.address, f"CONNECT {name}:443 HTTP/1.1\r\nHost: {name}:443\r\n\r\n".encode(),
                                   read_until_close=False)))
    rec = gw.wait_log(lambda r: r.get("reason") == "destination_name_prohibited" and r["method"] == "CONNECT")
    assert rec["status"] == 403 and rec["profile"] == "chained"
    # SOCKS5 with the name unresolved (ATYP 3)
    with socket.create_connection(gw.started_event["listen"][1].rsplit(":", 1), timeout=10) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        raw = name.encode()
        s.sendall(b"\x05\x01\x00\x03" + bytes([len(raw)]) + raw + (443).to_bytes(2, "big"))
        assert s.recv(2) == b"\x05\x02"  # connection not allowed by ruleset
    assert upstream.seen() == [], f"{name} reached the chained proxy"


def test_real_clients_get_403_and_public_names_go_through(start_gateway, upstream):
    gw = _chained(start_gateway, upstream)
    proxies = {"http": gw.url, "https": gw.url}
    r = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", gw.url, "http://localhost:8080/?apikey=x")
    assert r.stdout == b"403", r
    r = curl("-s", "-p", "-o", "/dev/null", "-w", "%{http_connect}", "-x", gw.url, "http://api.default.svc:443/")
    assert r.stdout == b"403", r
    with requests.Session() as s:
        s.trust_env = False
        assert s.get("http://db.internal:8080/", proxies=proxies, timeout=10).status_code == 403
        with pytest.raises(requests.exceptions.ProxyError, match="403 Destination Name Prohibited"):
            s.get("https://metrics.local/", proxies=proxies, timeout=10)
    sock = socks.socksocket()
    socks_host, socks_port = gw.started_event["listen"][1].rsplit(":", 1)
    sock.set_proxy(socks.SOCKS5, socks_host, int(socks_port), rdns=True)
    with pytest.raises(socks.GeneralProxyError), contextlib.closing(sock):
        sock.settimeout(10)
        sock.connect(("kubernetes", 443))
    assert upstream.seen() == []
    # a public name goes to the chained proxy as it was asked (it answers 502 itself)
    r = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", gw.url, "http://api.vendor-x.example:8080/p")
    assert r.stdout == b"502", r
    r = curl("-s", "-p", "-o", "/dev/null", "-w", "%{http_connect}", "-x", gw.url, "http://files.vendor-x.example:443/")
    assert r.stdout == b"502", r
    assert upstream.seen() == ["GET http://api.vendor-x.example:8080/p HTTP/1.1",
                               "CONNECT files.vendor-x.example:443 HTTP/1.1"]


def test_operator_suffixes(start_gateway, upstream):
    """``deny_suffixes`` adds names (a Kubernetes namespace, a corporate domain);
    ``allow_suffixes`` exempts names the chained proxy is meant to reach."""
    gw = _chained(start_gateway, upstream, deny_suffixes=["corp.example", "data-jobs"],
                  allow_suffixes=["wiki.internal", "localhost"])
    for name in ("wiki.corp.example", "results-store.data-jobs", "db.internal"):
        _refused(Response(raw_exchange(gw.address, f"CONNECT {name}:443 HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
                                       read_until_close=False)))
    for name in ("wiki.internal", "localhost"):
        resp = Response(raw_exchange(gw.address, f"CONNECT {name}:443 HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
                                     read_until_close=False))
        assert resp.status == 502, resp  # the chained proxy's own answer: it was asked
    assert upstream.seen() == ["CONNECT wiki.internal:443 HTTP/1.1", "CONNECT localhost:443 HTTP/1.1"]


def test_internal_names_all_applies_to_direct_profiles_before_dns(start_gateway, origin):
    """``internal_names: all``: a direct profile refuses the names before any lookup, even where
    ``allow_private`` would let their addresses through (here localhost is 127.0.0.1, exempt)."""
    gw = start_gateway(base_config(security={"internal_names": "all", "connect_ports": [origin.port]}))
    resp = Response(raw_exchange(gw.address, f"GET http://localhost:{origin.port}/ HTTP/1.1\r\nHost: x\r\n\r\n"
                                 .encode(), read_until_close=False))
    _refused(resp)
    assert b"not sent to the resolver" in resp.raw
    ok = curl("-x", gw.url, origin.url("/ok"))
    assert ok.stdout == b"hello /ok\n", ok
