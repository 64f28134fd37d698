"""Several worker processes share the listener (SO_REUSEPORT): metrics are merged across
them, reloads and SIGTERM reach all of them, and nothing is left behind."""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request

from .peers import base_config, raw_exchange


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_two_workers(start_gateway, origin):
    cfg = base_config(listen=[{"address": f"127.0.0.1:{_free_port()}"}], workers=2)
    gw = start_gateway(cfg)
    gw.wait_event("started", after=0)
    deadline = time.monotonic() + 10
    while sum(1 for e in gw.events if e.get("event") == "started") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = {e["pid"] for e in gw.events if e.get("event") == "started"}
    assert len(pids) == 2
    for i in range(40):
        resp = raw_exchange(gw.address, f"GET {origin.url(f'/w{i}')} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
        assert resp.startswith(b"HTTP/1.1 200"), resp[:100]
    deadline = time.monotonic() + 5
    while len(gw.log) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len({rec["target"] for rec in gw.log}) == 40  # one whole line per request, from either worker
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(gw.admin + "/metrics", timeout=5).read().decode()
    line = next(ln for ln in text.splitlines()
                if ln.startswith('egressgate_requests_total{client="local",method="GET",profile="default",status="200"}'))
    assert float(line.rsplit(" ", 1)[1]) == 40.0  # the sum over both workers
    assert 'process_resident_memory_bytes{worker="1"}' in text
    n = len(gw.events)
    gw.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while sum(1 for e in gw.events[n:] if e.get("event") == "reloaded") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {e["worker"] for e in gw.events[n:] if e.get("event") == "reloaded"} == {0, 1}
    gw.signal(signal.SIGTERM)
    assert gw.wait(timeout=30) == 0
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"worker {pid} outlived the gateway")
