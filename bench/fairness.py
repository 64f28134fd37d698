#!/usr/bin/env python3
"""Fairness benchmark: a well-behaved client's request latency while another client floods the
gateway with 1-byte chunks (the CPU-per-byte attack of issue 12), against the same latency with
no flood, in the same run.

    .venv/bin/python bench/fairness.py [--requests N] [--flood-seconds S]

Starts the gateway (embedded config plus a private listener) and a keep-alive origin on
loopback, measures N sequential GETs through the gateway quietly, then again while a second
connection streams a chunked POST of 1-byte chunks for the whole measurement. Prints p50, p99
and max for both, and the ratios. Bounded: N requests, at most --flood-seconds of flood.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _Origin(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # one write: no Nagle / delayed-ACK stall in the measurement
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def do_POST(self) -> None:  # read the chunked body to its end, then answer
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.rfile.readline()
                break
            self.rfile.read(size + 2)
        self.do_GET()


def _start_gateway(tmp: str) -> tuple[subprocess.Popen, str]:
    cfg = Path(tmp) / "fair.yaml"
    cfg.write_text(json.dumps({"listen": [{"address": "127.0.0.1:0"}], "admin": {"address": None},
                               "security": {"allow_private": ["127.0.0.0/8"]},
                               "log": {"access": "none"}}))
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = subprocess.Popen([sys.executable, "-m", "egressgate", "serve", "--config", str(cfg)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, cwd=ROOT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        doc = json.loads(line)
        if doc.get("event") == "started":
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, doc["listen"][0]
    proc.kill()
    raise SystemExit("the gateway did not start")


def _latencies(address: str, url: str, n: int) -> list[float]:
    host, port = address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = []
    request = f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    for _ in range(n):
        t0 = time.perf_counter()
        s.sendall(request)
        got = b""
        while not got.endswith(b"ok"):
            chunk = s.recv(4096)
            if not chunk:
                raise SystemExit("the gateway closed the measuring connection")
            got += chunk
        out.append(time.perf_counter() - t0)
    s.close()
    return out


def _flood(address: str, url: str, stop: threading.Event, seconds: float, sent: list[int]) -> None:
    host, port = address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(f"POST {url} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    block = b"1\r\nx\r\n" * 40000
    deadline = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < deadline:
        s.sendall(block)
        sent[0] += 40000
    s.sendall(b"0\r\n\r\n")
    s.close()


def _summary(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"p50_ms": xs[len(xs) // 2] * 1000, "p99_ms": xs[int(len(xs) * 0.99) - 1] * 1000, "max_ms": xs[-1] * 1000}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--flood-seconds", type=float, default=30.0)
    args = ap.parse_args()
    origin = ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{origin.server_address[1]}/"
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = _start_gateway(tmp)
        try:
            quiet = _summary(_latencies(address, url, args.requests))
            stop, sent = threading.Event(), [0]
            flooder = threading.Thread(target=_flood, args=(address, url, stop, args.flood_seconds, sent), daemon=True)
            flooder.start()
            time.sleep(0.5)  # let the flood get going (a benchmark, not a test)
            busy = _summary(_latencies(address, url, args.requests))
            stop.set()
            flooder.join(args.flood_seconds + 10)
        finally:
            proc.terminate()
            proc.wait(30)
            origin.shutdown()
    print(f"{'':24}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for name, row in (("quiet", quiet), ("beside a 1-byte flood", busy)):
        print(f"{name:24}{row['p50_ms']:10.3f}{row['p99_ms']:10.3f}{row['max_ms']:10.3f}")
    print(f"ratio (flood / quiet)   {busy['p50_ms'] / quiet['p50_ms']:10.2f}{busy['p99_ms'] / quiet['p99_ms']:10.2f}"
          f"{busy['max_ms'] / quiet['max_ms']:10.2f}")
    print(f"1-byte chunks sent by the flooder meanwhile: {sent[0]:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
