#!/usr/bin/env python3
"""A bounded soak of the gateway (issue 8): mixed CONNECT and plain-HTTP traffic with injected
upstream faults and a config reload every minute, sampling the gateway's RSS, open fds,
threads and connections from /proc and the admin API, then a verdict.

    .venv/bin/python bench/soak.py                 # 10 minutes
    .venv/bin/python bench/soak.py --minutes 30
    .venv/bin/python bench/soak.py --quick         # ~40 s: 30 s of traffic, a reload every 10 s

Traffic (worker threads, each op checked): GET of a Content-Length or chunked body, POST of a
body the origin hashes, a CONNECT tunnel through which an echo server returns what was sent
(every byte compared by sha256); and faults: an origin that resets in the middle of a body,
a tunnel whose far end resets. Plain requests reuse keep-alive connections now and then.

Verdict (exit 0 when PASS, 1 when FAIL): the gateway is alive with no internal error; every
successful transfer byte-exact and no ordinary transfer failed; every fault ended promptly
(no hang); every reload accepted; with traffic paused and the gateway settled, RSS and open
fds at the end within 5 % of the same measurement after warm-up, threads not more and no
client connection left; one access-log record per request.

Everything is on 127.0.0.1; every loop is bounded by a deadline and a count; only the
gateway process started here is ever signalled.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parent.parent
MAX_OPS_PER_WORKER = 2_000_000
IO_TIMEOUT = 10.0


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rst_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# ----------------------------------------------------------------------------- peers

class OriginHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        n, seed = int(q.get("n", "0")), int(q.get("seed", "0"))
        body = payload(n, seed)
        if url.path == "/reset":
            # the injected fault: announce n bytes, send half, then RST
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            self.wfile.write(body[: n // 2])
            self.wfile.flush()
            time.sleep(0.01)
            rst_close(self.connection)
            self.close_connection = True
            return
        self.send_response(200)
        if url.path == "/chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, n, 65536):
                part = body[i:i + 65536]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(n))
            self.end_headers()
            self.wfile.write(body)

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        h = hashlib.sha256()
        left = n
        while left:
            data = self.rfile.read(min(left, 1 << 16))
            if not data:
                break
            h.update(data)
            left -= len(data)
        body = json.dumps({"bytes": n - left, "sha256": h.hexdigest()}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class TcpServer:
    """echo: echo until EOF, then close; reset: read a little, then RST."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = self.sock.getsockname()[1]
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            if self.kind == "reset":
                conn.recv(1024)
                rst_close(conn)
                return
            while True:
                data = conn.recv(1 << 16)
                if not data:
                    break
                conn.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            conn.close()

    def close(self) -> None:
        self.stop = True
        self.sock.close()


# ----------------------------------------------------------------------------- the gateway

class Gateway:
    def __init__(self, tmp: Path, connect_ports: list[int]) -> None:
        self.config_path = tmp / "soak.yaml"
        self.connect_ports = connect_ports
        self.generation = 0
        self.write_config()
        self.records = 0
        self.statuses: dict[int, int] = {}
        self.events: list[dict] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "egressgate", "serve", "--config", str(self.config_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT),
            env={**os.environ, "PYTHONUNBUFFERED": "1",
                 "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")})
        self.pid = self.proc.pid
        self._started = threading.Event()
        threading.Thread(target=self._stdout, daemon=True).start()
        threading.Thread(target=self._stderr, daemon=True).start()
        if not self._started.wait(20):
            self.stop()
            raise RuntimeError("the gateway did not start")
        started = next(e for e in self.events if e.get("event") == "started")
        host, port = started["listen"][0].rsplit(":", 1)
        self.address = (host, int(port))
        self.admin = "http://" + started["admin"]

    def write_config(self) -> None:
        # each generation differs (client_idle), so every reload really swaps the runtime
        text = f"""\
listen: [{{address: "127.0.0.1:0"}}]
admin: {{address: "127.0.0.1:0"}}
clients: [{{name: soak, from: [127.0.0.1/32]}}]
security: {{allow_private: [127.0.0.0/8], connect_ports: {self.connect_ports}}}
timeouts: {{client_head: 5s, client_idle: {60 + self.generation % 2}s, upstream_connect: 2s,
           upstream_response: 10s, upstream_idle: 1s, tunnel_idle: 10s}}
"""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)

    def _stdout(self) -> None:
        for line in self.proc.stdout:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            self.records += 1
            st = rec.get("status", 0)
            self.statuses[st] = self.statuses.get(st, 0) + 1

    def _stderr(self) -> None:
        for raw in self.proc.stderr:
            try:
                doc = json.loads(raw)
            except ValueError:
                self.events.append({"event": "stderr", "line": raw.decode(errors="replace")[:500]})
                continue
            self.events.append(doc)
            if doc.get("event") == "started":
                self._started.set()

    def reload(self) -> bool:
        self.generation += 1
        self.write_config()
        req = urllib.request.Request(self.admin + "/-/reload", method="POST")  # (no form body: see README "Admin endpoints")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=10) as r:
                return bool(json.loads(r.read()).get("reloaded"))
        except OSError:
            return False

    def status(self) -> dict:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(self.admin + "/status", timeout=10) as r:
            return json.loads(r.read())

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# ----------------------------------------------------------------------------- load

class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok: dict[str, int] = {}
        self.bytes = 0
        self.faults = 0
        self.requests = 0  # requests the gateway saw (one access-log record each)
        self.errors: list[str] = []
        self.mismatches = 0

    def count(self, kind: str, nbytes: int = 0) -> None:
        with self.lock:
            self.ok[kind] = self.ok.get(kind, 0) + 1
            self.bytes += nbytes

    def error(self, what: str) -> None:
        with self.lock:
            if len(self.errors) < 1000:
                self.errors.append(what)


class Mismatch(Exception):
    pass


class Conn:
    """A client connection to the gateway with a small buffered reader."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=IO_TIMEOUT)
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("closed by the gateway")
        self.buf += data

    def read_until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            self._fill()
        out, _, self.buf = self.buf.partition(sep)
        return out

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_response(self) -> tuple[int, dict[bytes, bytes], bytes]:
        head = self.read_until(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            while True:
                size = int(self.read_until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    self.read_until(b"\r\n")
                    break
                parts.append(self.read_exact(size))
                self.read_exact(2)
            body = b"".join(parts)
        elif b"content-length" in headers:
            body = self.read_exact(int(headers[b"content-length"]))
        else:
            body = b""
        return status, headers, body

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Worker(threading.Thread):
    def __init__(self, n: int, env: dict, stats: Stats, deadline: float, run: threading.Event,
                 idle: threading.Event, seed: int) -> None:
        super().__init__(daemon=True)
        self.n = n
        self.env = env
        self.stats = stats
        self.deadline = deadline
        self.run_flag = run
        self.idle = idle
        self.rng = random.Random(seed * 1000 + n)
        self.conn: Conn | None = None
        self.stopped = threading.Event()

    def run(self) -> None:
        ops = 0
        try:
            while ops < MAX_OPS_PER_WORKER and time.monotonic() < self.deadline:
                if not self.run_flag.is_set():
                    self._drop()
                    self.idle.set()
                    self.run_flag.wait(min(1.0, max(0.0, self.deadline - time.monotonic())))
                    continue
                ops += 1
                self.one()
        finally:
            self._drop()
            self.stopped.set()

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _conn(self) -> Conn:
        if self.conn is None or self.rng.random() < 0.3:
            self._drop()
            self.conn = Conn(self.env["gateway"])
        return self.conn

    def one(self) -> None:
        r = self.rng.random()
        kind = ("get" if r < 0.33 else "chunked" if r < 0.43 else "post" if r < 0.58 else "tunnel" if r < 0.85
                else "fault_http" if r < 0.93 else "fault_tunnel")
        t0 = time.monotonic()
        try:
            getattr(self, "op_" + kind)()
        except Mismatch as exc:
            self.stats.mismatches += 1
            self.stats.error(f"{kind}: MISMATCH {exc}")
            self._drop()
        except (OSError, ValueError, IndexError) as exc:
            self.stats.error(f"{kind}: {type(exc).__name__}: {exc} after {time.monotonic() - t0:.2f}s")
            self._drop()

    def _size(self) -> int:
        return self.rng.choice([0, 1, 1000, 16384, 65536, 200_000, 1_000_000]) + self.rng.randrange(0, 1000)

    def op_get(self, path: str = "/bytes") -> None:
        n, seed = self._size(), self.rng.randrange(1 << 30)
        c = self._conn()
        origin = self.env["origin"]
        with self.stats.lock:
            self.stats.requests += 1
        c.sock.sendall(f"GET http://{origin}{path}?n={n}&seed={seed} HTTP/1.1\r\nHost: {origin}\r\n\r\n".encode())
        status, headers, body = c.read_response()
        if status != 200 or sha(body) != sha(payload(n, seed)):
            raise Mismatch(f"GET {path} n={n}: status {status}, {len(body)} bytes")
        if headers.get(b"connection", b"").lower() == b"close":
            self._drop()
        self.stats.count("get" if path == "/bytes" else "chunked", n)

    def op_chunked(self) -> None:
        self.op_get("/chunked")

    def op_post(self) -> None:
        n, seed = self._size(), self.rng.randrange(1 << 30)
        body = payload(n, seed)
        c = self._conn()
        origin = self.env["origin"]
        with self.stats.lock:
            self.stats.requests += 1
        c.sock.sendall(f"POST http://{origin}/upload HTTP/1.1\r\nHost: {origin}\r\nContent-Length: {n}\r\n\r\n"
                       .encode() + body)
        status, _, answer = c.read_response()
        doc = json.loads(answer) if status == 200 else {}
        if doc.get("sha256") != sha(body) or doc.get("bytes") != n:
            raise Mismatch(f"POST n={n}: status {status}, {answer[:100]!r}")
        self.stats.count("post", n)

    def _tunnel(self, port: int) -> Conn:
        with self.stats.lock:
            self.stats.requests += 1
        c = Conn(self.env["gateway"])
        c.sock.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        head = c.read_until(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            c.close()
            raise Mismatch(f"CONNECT: {head[:100]!r}")
        return c

    def op_tunnel(self) -> None:
        n, seed = max(1, self._size()), self.rng.randrange(1 << 30)
        data = payload(n, seed)
        c = self._tunnel(self.env["echo"])
        try:
            sender = threading.Thread(target=self._send_then_eof, args=(c.sock, data), daemon=True)
            sender.start()
            got = c.read_exact(n)
            sender.join(IO_TIMEOUT)
            c.sock.settimeout(IO_TIMEOUT)
            rest = c.sock.recv(1)  # the echo server closes after our EOF; the tunnel passes it on
            if sha(got) != sha(data) or rest or c.buf:
                raise Mismatch(f"tunnel n={n}: {len(got)} bytes back")
        finally:
            c.close()
        self.stats.count("tunnel", n)

    @staticmethod
    def _send_then_eof(sock: socket.socket, data: bytes) -> None:
        with contextlib.suppress(OSError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)

    def op_fault_http(self) -> None:
        # the origin resets halfway through: a short body and a closed connection, promptly
        n = 100_000 + self.rng.randrange(100_000)
        c = Conn(self.env["gateway"])
        origin = self.env["origin"]
        with self.stats.lock:
            self.stats.requests += 1
        t0 = time.monotonic()
        try:
            c.sock.sendall(f"GET http://{origin}/reset?n={n}&seed=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            got = b""
            try:
                while True:
                    c._fill()
            except (ConnectionError, OSError):
                got = c.buf
            if time.monotonic() - t0 > IO_TIMEOUT - 1:
                raise Mismatch("the gateway did not end a reset transfer")
            if not (got.startswith(b"HTTP/1.1 200") and len(got.partition(b"\r\n\r\n")[2]) < n
                    or got.startswith(b"HTTP/1.1 502")):
                raise Mismatch(f"reset transfer answered {got[:80]!r}")
        finally:
            c.close()
        with self.stats.lock:
            self.stats.faults += 1

    def op_fault_tunnel(self) -> None:
        c = self._tunnel(self.env["reset"])
        t0 = time.monotonic()
        try:
            with contextlib.suppress(OSError):
                c.sock.sendall(b"x" * 4096)
            try:
                while True:
                    c._fill()
            except (ConnectionError, OSError):
                pass
            if time.monotonic() - t0 > IO_TIMEOUT - 1:
                raise Mismatch("the gateway did not end a reset tunnel")
        finally:
            c.close()
        with self.stats.lock:
            self.stats.faults += 1


# ----------------------------------------------------------------------------- the run

def settle(gw: Gateway, timeout: float = 10.0) -> dict:
    """Wait until no client connection is open and the fd count stops falling; measure."""
    deadline = time.monotonic() + timeout
    # no client connection open, and no idle origin connection left in the pool (closed by the
    # sweep past upstream_idle): waited for, not slept on (a fixed 1.5 s lost the race to a sweep)
    while time.monotonic() < deadline:
        conns = gw.status()["connections"]
        if conns["total"] == 0 and conns["idle_upstream"] == 0:
            break
        time.sleep(0.1)
    last = gw.fds()
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = gw.fds()
        if now >= last:
            break
        last = now
    # counted before the status request below: the gateway closes that request's own admin
    # connection a moment after the answer, and counting right after it sometimes saw it (+1)
    fds = last
    st = gw.status()
    return {"rss_kib": gw.rss_kib(), "fds": fds, "threads": gw.threads(),
            "connections": st["connections"]["total"]}


def pause(workers: list[Worker], run: threading.Event, idles: list[threading.Event], timeout: float = 30) -> None:
    for ev in idles:
        ev.clear()
    run.clear()
    deadline = time.monotonic() + timeout
    for w, ev in zip(workers, idles, strict=True):
        while not ev.is_set() and not w.stopped.is_set() and time.monotonic() < deadline:
            ev.wait(0.1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help="30 s of traffic, a reload every 10 s")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=8)
    ap.add_argument("--json", help="write the samples and the verdict to this file")
    a = ap.parse_args(argv)
    duration = 30.0 if a.quick else a.minutes * 60
    reload_every = 10.0 if a.quick else 60.0
    sample_every = 2.0 if a.quick else 10.0
    warmup = min(max(duration * 0.2, 8.0), 60.0)

    origin = ThreadingHTTPServer(("127.0.0.1", 0), OriginHandler)
    origin.daemon_threads = True
    threading.Thread(target=origin.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    echo, reset = TcpServer("echo"), TcpServer("reset")
    tmp = Path(tempfile.mkdtemp(prefix="egressgate-soak-"))
    gw = Gateway(tmp, [echo.port, reset.port])
    env = {"gateway": gw.address, "origin": f"127.0.0.1:{origin.server_address[1]}", "echo": echo.port,
           "reset": reset.port}
    print(f"soak: {duration:.0f} s of traffic, {a.workers} workers, reload every {reload_every:.0f} s, "
          f"gateway pid {gw.pid} on {gw.address[0]}:{gw.address[1]}", flush=True)

    stats = Stats()
    start = time.monotonic()
    end = start + duration
    run = threading.Event()
    run.set()
    idles = [threading.Event() for _ in range(a.workers)]
    workers = [Worker(i, env, stats, end, run, idles[i], a.seed) for i in range(a.workers)]
    for w in workers:
        w.start()

    samples: list[dict] = []
    reloads: list[bool] = []
    checkpoints: dict[str, dict] = {}
    # the first reload comes halfway through warm-up: reloads run on the default executor,
    # whose (bounded) thread appears on first use and must be there before the baseline
    next_reload = start + min(reload_every, warmup / 2)
    next_sample = start
    print(f"{'t(s)':>6} {'rss MiB':>8} {'fds':>5} {'thr':>4} {'conns':>5} {'ops':>7} {'MB':>8} {'errs':>5}", flush=True)
    try:
        while time.monotonic() < end and gw.alive():
            now = time.monotonic()
            if "warm" not in checkpoints and now - start >= warmup:
                pause(workers, run, idles)
                checkpoints["warm"] = settle(gw)
                print(f"warm-up checkpoint (traffic paused, settled): {checkpoints['warm']}", flush=True)
                run.set()
            if now >= next_reload:
                reloads.append(gw.reload())
                next_reload = max(next_reload, start) + (reload_every if len(reloads) > 1 else
                                                          reload_every - min(reload_every, warmup / 2))
            if now >= next_sample:
                st = gw.status()
                s = {"t": round(now - start, 1), "rss_kib": gw.rss_kib(), "fds": gw.fds(), "threads": gw.threads(),
                     "connections": st["connections"]["total"], "ops": sum(stats.ok.values()) + stats.faults,
                     "bytes": stats.bytes, "errors": len(stats.errors)}
                samples.append(s)
                print(f"{s['t']:6.0f} {s['rss_kib'] / 1024:8.1f} {s['fds']:5d} {s['threads']:4d} {s['connections']:5d} "
                      f"{s['ops']:7d} {s['bytes'] / 1e6:8.0f} {s['errors']:5d}", flush=True)
                next_sample += sample_every
            time.sleep(0.1)
        for w in workers:
            w.join(IO_TIMEOUT * 3)
        hung = [w.n for w in workers if w.is_alive()]
        alive = gw.alive()
        if alive:
            checkpoints["end"] = settle(gw)
            print(f"end checkpoint (traffic stopped, settled): {checkpoints['end']}", flush=True)
            time.sleep(0.5)  # the access log is written by a thread: let it catch up
    finally:
        crashed = not gw.alive()
        gw.stop()
        origin.shutdown()
        origin.server_close()
        echo.close()
        reset.close()

    problems = []
    internal = [e for e in gw.events if e.get("event") in ("internal_error", "stderr")]
    if crashed:
        problems.append(f"the gateway died (exit {gw.proc.returncode})")
    if internal:
        problems.append(f"{len(internal)} internal errors, first: {str(internal[0])[:300]}")
    if hung:
        problems.append(f"workers {hung} hung")
    if stats.mismatches:
        problems.append(f"{stats.mismatches} transfers not byte-exact")
    if stats.errors:
        problems.append(f"{len(stats.errors)} failed operations, first: {stats.errors[:3]}")
    if not all(reloads) or not reloads:
        problems.append(f"reloads: {reloads}")
    warm, last = checkpoints.get("warm"), checkpoints.get("end")
    if warm is None or last is None:
        problems.append("no warm-up or end checkpoint")
    else:
        if last["rss_kib"] > warm["rss_kib"] * 1.05:
            problems.append(f"RSS grew {100 * (last['rss_kib'] / warm['rss_kib'] - 1):.1f} % after warm-up")
        if last["fds"] > warm["fds"] * 1.05:
            problems.append(f"open fds grew from {warm['fds']} to {last['fds']}")
        if last["threads"] > warm["threads"]:
            problems.append(f"threads grew from {warm['threads']} to {last['threads']}")
        if last["connections"]:
            problems.append(f"{last['connections']} client connections left open")
    if alive and gw.records != stats.requests:
        problems.append(f"{gw.records} access-log records for {stats.requests} requests")

    verdict = "PASS" if not problems else "FAIL"
    summary = {
        "verdict": verdict, "problems": problems, "duration_s": round(time.monotonic() - start, 1),
        "operations": stats.ok, "faults_injected": stats.faults, "requests": stats.requests,
        "access_log_records": gw.records, "statuses": gw.statuses, "bytes_checked": stats.bytes,
        "reloads": len(reloads), "reloads_ok": sum(reloads), "checkpoints": checkpoints,
        "first_sample": samples[0] if samples else None, "last_sample": samples[-1] if samples else None,
    }
    if a.json:
        Path(a.json).write_text(json.dumps({**summary, "samples": samples}, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"verdict: {verdict}" + (" (" + "; ".join(problems) + ")" if problems else ""), flush=True)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
