"""Several worker processes share the listener (SO_REUSEPORT): each reports what it really
listens on, metrics are merged across them, reloads and SIGTERM reach all of them, and
nothing is left behind (no process, no private admin socket, no socket directory)."""

from __future__ import annotations

import os
import signal
import stat
import urllib.request

from .peers import ReservedPort, base_config, raw_exchange, wait_for


def _started(gw) -> list[dict]:
    return [e for e in gw.events if e.get("event") == "started"]


def test_two_workers(start_gateway, origin):
    with ReservedPort() as port:  # workers need a fixed port: held until they listen on it
        gw = start_gateway(base_config(listen=[{"address": port.address}], workers=2))
        wait_for(lambda: len(_started(gw)) >= 2, "both workers' started events")
    by_worker = {e["worker"]: e for e in _started(gw)}
    assert sorted(by_worker) == [0, 1], _started(gw)
    pids = {e["pid"] for e in by_worker.values()}
    assert len(pids) == 2
    # every worker reports what it really listens on: the shared proxy port, and worker 0 the
    # admin TCP address; worker 1 only a private Unix socket, named as a path
    assert by_worker[0]["listen"] == by_worker[1]["listen"] == [port.address]
    assert gw.admin == f"http://{by_worker[0]['admin']}" and by_worker[0]["admin"].startswith("127.0.0.1:")
    assert by_worker[1]["admin"] is None, by_worker[1]
    sock_path = by_worker[1]["admin_socket"]
    assert stat.S_ISSOCK(os.stat(sock_path).st_mode), sock_path
    sockdir = os.path.dirname(sock_path)

    for i in range(40):
        resp = raw_exchange(gw.address, f"GET {origin.url(f'/w{i}')} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
        assert resp.startswith(b"HTTP/1.1 200"), resp[:100]
    wait_for(lambda: len(gw.log) >= 40, "40 access-log records")
    assert len({rec["target"] for rec in gw.log}) == 40  # one whole line per request, from either worker
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(gw.admin + "/metrics", timeout=5).read().decode()
    line = next(ln for ln in text.splitlines()
                if ln.startswith('egressgate_requests_total{client="local",method="GET",profile="default",status="200"}'))
    assert float(line.rsplit(" ", 1)[1]) == 40.0  # the sum over both workers
    assert 'process_resident_memory_bytes{worker="1"}' in text
    n = len(gw.events)
    gw.signal(signal.SIGHUP)
    wait_for(lambda: {e["worker"] for e in gw.events[n:] if e.get("event") == "reloaded"} == {0, 1},
             "a reloaded event from each worker")
    gw.signal(signal.SIGTERM)
    assert gw.wait(timeout=30) == 0
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"worker {pid} outlived the gateway")
    assert not os.path.exists(sockdir), f"the workers' socket directory was left behind: {os.listdir(sockdir)}"
