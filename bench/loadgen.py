"""Load generators for the benchmark; each runs as its own process and prints one JSON object.

    loadgen.py throughput --target H:P [--proxy H:P] --dir up|down --bytes N
    loadgen.py tunnels    --targets H:P,... [--proxy H:P] --workers 50 --duration S
    loadgen.py latency    --target H:P [--proxy H:P] --requests 2000
    loadgen.py hold       --targets H:P,... [--proxy H:P]      (driven by commands on stdin)

``--proxy`` absent means the no-proxy path (straight to the target). ``--auth user:pass`` adds a
``Proxy-Authorization: Basic`` header. ``--sources 127.0.0.2,...`` spreads client source addresses
over 127.0.0.0/8 (with IP_BIND_ADDRESS_NO_PORT) so that ephemeral ports are not exhausted.

Every loop is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import select
import socket
import sys
import time

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
CHUNK = 1 << 20
PING = b"0123456789abcdef"  # 16 bytes


def hostport(s: str) -> tuple[str, int]:
    h, _, p = s.rpartition(":")
    return h, int(p)


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def auth_header(auth: str | None) -> bytes:
    if not auth:
        return b""
    return b"Proxy-Authorization: Basic " + base64.b64encode(auth.encode()) + b"\r\n"


def connect_request(target: tuple[str, int], auth: str | None) -> bytes:
    hp = f"{target[0]}:{target[1]}".encode()
    return b"CONNECT " + hp + b" HTTP/1.1\r\nHost: " + hp + b"\r\n" + auth_header(auth) + b"\r\n"


def quantiles(samples: list[float], qs=(0.5, 0.9, 0.99, 0.999)) -> dict[str, float]:
    if not samples:
        return {}
    s = sorted(samples)
    out = {}
    for q in qs:
        i = min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))
        out[f"p{q * 100:g}"] = s[i]
    out["mean"] = sum(s) / len(s)
    out["max"] = s[-1]
    return out


def make_socket(source: str | None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if source:
        s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.bind((source, 0))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def blocking_tunnel(proxy, target, auth, timeout=10.0) -> socket.socket:
    """Connect to target, through proxy with CONNECT when given; returns the ready socket."""
    s = make_socket(None)
    s.settimeout(timeout)
    s.connect(proxy or target)
    if proxy:
        s.sendall(connect_request(target, auth))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("proxy closed during CONNECT")
            head += chunk
            if len(head) > 65536:
                raise ConnectionError("CONNECT response head too long")
        status = head.split(b"\r\n", 1)[0]
        if status.split()[1:2] != [b"200"]:
            raise ConnectionError(f"CONNECT refused: {status!r}")
        if head.index(b"\r\n\r\n") + 4 != len(head):
            raise ConnectionError("unexpected bytes after CONNECT response")
    return s


# ---------------------------------------------------------------------------- throughput


def cmd_throughput(a) -> dict:
    proxy = hostport(a.proxy) if a.proxy else None
    target = hostport(a.target)
    s = blocking_tunnel(proxy, target, a.auth)
    s.settimeout(a.timeout)
    n = a.bytes
    cpu0 = own_cpu()
    if a.dir == "up":
        payload = memoryview(b"\xa5" * CHUNK)
        t0 = time.perf_counter()
        s.sendall(b"UP %020d\n" % n)
        left = n
        deadline = time.monotonic() + a.timeout
        while left > 0 and time.monotonic() < deadline:
            if left >= CHUNK:
                s.sendall(payload)
                left -= CHUNK
            else:
                s.sendall(payload[:left])
                left = 0
        reply = b""
        while b"\n" not in reply:
            chunk = s.recv(64)
            if not chunk:
                break
            reply += chunk
        t1 = time.perf_counter()
        got = int(reply.split()[1]) if reply.startswith(b"OK ") else 0
    else:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        t0 = time.perf_counter()
        s.sendall(b"DN %020d\n" % n)
        got = 0
        deadline = time.monotonic() + a.timeout
        while got < n and time.monotonic() < deadline:
            r = s.recv_into(view, CHUNK)
            if r == 0:
                break
            got += r
        t1 = time.perf_counter()
    cpu1 = own_cpu()
    s.close()
    secs = t1 - t0
    ok = got == n
    return {
        "dir": a.dir,
        "bytes": got,
        "expected": n,
        "ok": ok,
        "seconds": secs,
        "MBps": (got / secs / 1e6) if secs > 0 else 0.0,
        "client_cpu_s": cpu1 - cpu0,
    }


# ---------------------------------------------------------------------------- tunnels/s


class _TunnelProto:
    """connect -> (CONNECT -> 200) -> 16-byte echo -> close, as a bare asyncio protocol."""

    __slots__ = ("req", "tr", "buf", "state", "fut", "t200")

    def __init__(self, req: bytes | None, fut: asyncio.Future):
        self.req = req
        self.fut = fut
        self.buf = b""
        self.state = 0  # 0: waiting for CONNECT reply, 1: waiting for echo, 2: done
        self.t200 = 0.0
        self.tr = None

    def connection_made(self, tr):
        self.tr = tr
        if self.req is not None:
            tr.write(self.req)
        else:
            self.state = 1
            tr.write(PING)

    def data_received(self, data):
        self.buf += data
        if self.state == 0:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                if len(self.buf) > 65536:
                    self._fail("CONNECT head too long")
                return
            line = self.buf[: self.buf.find(b"\r\n")]
            parts = line.split()
            if len(parts) < 2 or parts[1] != b"200":
                self._fail("status " + line[:40].decode("latin-1"))
                return
            self.t200 = time.perf_counter()
            self.buf = self.buf[i + 4 :]
            self.state = 1
            self.tr.write(PING)
        if self.state == 1 and len(self.buf) >= 16:
            self.state = 2
            ok = self.buf[:16] == PING
            self.tr.close()
            if not self.fut.done():
                if ok:
                    self.fut.set_result(self.t200)
                else:
                    self.fut.set_exception(ConnectionError("echo mismatch"))

    def _fail(self, why: str):
        self.state = 2
        self.tr.close()
        if not self.fut.done():
            self.fut.set_exception(ConnectionError(why))

    def eof_received(self):
        if self.state != 2:
            self._fail("eof")
        return False

    def connection_lost(self, exc):
        if not self.fut.done():
            self.fut.set_exception(exc or ConnectionError("lost"))

    def pause_writing(self):
        pass

    def resume_writing(self):
        pass


async def _tunnels(a) -> dict:
    loop = asyncio.get_running_loop()
    proxy = hostport(a.proxy) if a.proxy else None
    targets = [hostport(t) for t in a.targets.split(",")]
    # Without --sources the kernel picks the source port at connect() time, which lets it reuse
    # loopback TIME_WAIT ports (net.ipv4.tcp_tw_reuse=2, the default); with --sources each
    # connection binds 127.0.0.x first.
    sources = [(s, 0) for s in a.sources.split(",")] if a.sources else [None]
    reqs = [connect_request(t, a.auth) if proxy else None for t in targets]
    if a.start_at:
        await asyncio.sleep(max(0.0, a.start_at - time.time()))
    t_start = time.perf_counter()
    end = t_start + a.duration
    lat_total: list[int] = []  # microseconds, connect() start -> echo back
    lat_200: list[int] = []  # microseconds, connect() start -> CONNECT 200
    errors: dict[str, int] = {}
    max_conns = a.max_conns

    async def worker(wid: int):
        src = sources[wid % len(sources)]
        k = wid
        while True:
            now = time.perf_counter()
            if now >= end or len(lat_total) >= max_conns:
                return
            ti = k % len(targets)
            k += 1
            t0 = time.perf_counter()
            addr = proxy or targets[ti]
            try:
                async with asyncio.timeout(a.timeout):
                    fut = loop.create_future()
                    await loop.create_connection(
                        lambda r=reqs[ti], f=fut: _TunnelProto(r, f), addr[0], addr[1], local_addr=src
                    )
                    t200 = await fut
                t1 = time.perf_counter()
                lat_total.append(int((t1 - t0) * 1e6))
                if proxy:
                    lat_200.append(int((t200 - t0) * 1e6))
            except (OSError, TimeoutError, ConnectionError) as e:
                key = type(e).__name__ + (f": {e}" if isinstance(e, ConnectionError) and str(e) else "")
                errors[key[:80]] = errors.get(key[:80], 0) + 1
                await asyncio.sleep(0.01)

    cpu0 = own_cpu()
    await asyncio.gather(*(worker(i) for i in range(a.workers)))
    elapsed = time.perf_counter() - t_start
    cpu1 = own_cpu()
    return {
        "count": len(lat_total),
        "elapsed": elapsed,
        "rate": len(lat_total) / elapsed if elapsed > 0 else 0.0,
        "errors": errors,
        "lat_total_us": lat_total if a.raw else None,
        "lat_200_us": lat_200 if a.raw else None,
        "total_q_us": quantiles(lat_total),
        "setup_q_us": quantiles(lat_200),
        "client_cpu_s": cpu1 - cpu0,
        "client_cpu_pct": 100.0 * (cpu1 - cpu0) / elapsed if elapsed > 0 else 0.0,
    }


def _run_async(coro_fn, a):
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    return asyncio.run(coro_fn(a))


# ---------------------------------------------------------------------------- latency


class _ClosedBeforeResponse(ConnectionError):
    pass


def _exchange(s: socket.socket, req: bytes, buf: bytearray, view: memoryview) -> bool:
    """Send one request, read one response (Content-Length framed); True if the peer will close."""
    s.sendall(req)
    have = 0
    head_end = -1
    need = -1
    close_after = False
    while True:
        r = s.recv_into(view[have:], len(buf) - have)
        if r == 0:
            if have == 0:
                raise _ClosedBeforeResponse("closed before the response")
            raise ConnectionError("closed mid-response")
        have += r
        if head_end < 0:
            head_end = bytes(buf[:have]).find(b"\r\n\r\n")
            if head_end >= 0:
                head = bytes(buf[:head_end]).lower()
                status = head.split(b"\r\n", 1)[0].split()
                if len(status) < 2 or status[1] != b"200":
                    raise ConnectionError(f"status {status[1:2]}")
                clen = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip() == b"content-length":
                        clen = int(v.strip())
                    elif k.strip() in (b"connection", b"proxy-connection") and b"close" in v:
                        close_after = True
                need = head_end + 4 + clen
        if need >= 0 and have >= need:
            return close_after


def cmd_latency(a) -> dict:
    """One keep-alive connection, sequential small GETs; per-request wall time."""
    proxy = hostport(a.proxy) if a.proxy else None
    target = hostport(a.target)
    hp = f"{target[0]}:{target[1]}".encode()
    path = (b"http://" + hp + b"/") if proxy else b"/"
    req = (
        b"GET "
        + path
        + b" HTTP/1.1\r\nHost: "
        + hp
        + b"\r\n"
        + (auth_header(a.auth) if proxy else b"")
        + b"\r\n"
    )
    samples: list[float] = []
    reconnects = 0
    errors = 0
    buf = bytearray(65536)
    view = memoryview(buf)
    s = None
    deadline = time.monotonic() + a.max_seconds
    total = a.warmup + a.requests
    i = 0
    while i < total and time.monotonic() < deadline and errors < 50:
        t0 = time.perf_counter()
        try:
            for attempt in (0, 1):
                fresh = s is None
                if s is None:
                    s = make_socket(None)
                    s.settimeout(5)
                    s.connect(proxy or target)
                    if i > 0:
                        reconnects += 1
                try:
                    close_after = _exchange(s, req, buf, view)
                    break
                except _ClosedBeforeResponse:
                    # the peer closed a kept-alive connection between requests: reconnect and
                    # resend; the time spent doing so stays in this request's sample
                    s.close()
                    s = None
                    if fresh or attempt == 1:
                        raise
            t1 = time.perf_counter()
            if i >= a.warmup:
                samples.append((t1 - t0) * 1e6)
            i += 1
            if not close_after:
                r, _, _ = select.select([s], [], [], 0)
                if r and s.recv(1, socket.MSG_PEEK) == b"":
                    close_after = True  # closed after the response (e.g. tinyproxy)
            if close_after:
                s.close()
                s = None
        except (OSError, ConnectionError, ValueError):
            errors += 1
            if s is not None:
                s.close()
            s = None
    if s is not None:
        s.close()
    return {"requests": len(samples), "reconnects": reconnects, "errors": errors, "q_us": quantiles(samples)}


# ---------------------------------------------------------------------------- idle tunnel holder


class _HoldProto:
    __slots__ = ("req", "tr", "buf", "state", "fut", "echo_fut")

    def __init__(self, req, fut):
        self.req = req
        self.fut = fut
        self.buf = b""
        self.state = 0
        self.tr = None
        self.echo_fut = None

    def connection_made(self, tr):
        self.tr = tr
        if self.req is not None:
            tr.write(self.req)
        else:
            self.state = 1
            self.fut.set_result(True)

    def data_received(self, data):
        self.buf += data
        if self.state == 0:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            parts = self.buf.split(b"\r\n", 1)[0].split()
            self.buf = self.buf[i + 4 :]
            if len(parts) < 2 or parts[1] != b"200":
                self.state = 3
                self.tr.close()
                if not self.fut.done():
                    self.fut.set_exception(ConnectionError("refused"))
                return
            self.state = 1
            if not self.fut.done():
                self.fut.set_result(True)
        if self.state == 1 and self.echo_fut is not None and len(self.buf) >= 16:
            self.buf = self.buf[16:]
            if not self.echo_fut.done():
                self.echo_fut.set_result(True)

    def ping(self, fut):
        self.echo_fut = fut
        self.tr.write(PING)

    def eof_received(self):
        self.state = 3
        return False

    def connection_lost(self, exc):
        self.state = 3
        if not self.fut.done():
            self.fut.set_exception(exc or ConnectionError("lost"))
        if self.echo_fut is not None and not self.echo_fut.done():
            self.echo_fut.set_exception(exc or ConnectionError("lost"))

    def pause_writing(self):
        pass

    def resume_writing(self):
        pass


async def _hold(a) -> dict:
    """Commands on stdin, one per line; one JSON line answers each:
    ``open N`` (hold N tunnels in total), ``check`` (echo on every tunnel), ``close`` (and exit)."""
    loop = asyncio.get_running_loop()
    proxy = hostport(a.proxy) if a.proxy else None
    targets = [hostport(t) for t in a.targets.split(",")]
    sources = a.sources.split(",") if a.sources else [None]
    reqs = [connect_request(t, a.auth) if proxy else None for t in targets]
    held: list[_HoldProto] = []
    counter = [0]
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def open_one(errors: dict):
        k = counter[0]
        counter[0] += 1
        ti = k % len(targets)
        sock = make_socket(sources[k % len(sources)])
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, proxy or targets[ti]), a.timeout)
            fut = loop.create_future()
            _, proto = await loop.create_connection(lambda: _HoldProto(reqs[ti], fut), sock=sock)
            await asyncio.wait_for(fut, a.timeout)
            held.append(proto)
            return True
        except (TimeoutError, OSError, ConnectionError) as e:
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            sock.close()
            return False

    async def open_to(n: int) -> dict:
        errors: dict[str, int] = {}
        t0 = time.perf_counter()
        deadline = t0 + a.max_seconds
        fails = 0
        while len(held) < n and time.perf_counter() < deadline and fails < a.max_fails:
            batch = min(a.concurrency, n - len(held))
            res = await asyncio.gather(*(open_one(errors) for _ in range(batch)))
            fails += res.count(False)
        return {"held": len(held), "errors": errors, "seconds": time.perf_counter() - t0}

    async def check() -> dict:
        alive = [p for p in held if p.state == 1]
        futs = []
        for p in alive:
            f = loop.create_future()
            p.ping(f)
            futs.append(f)
        ok = 0
        if futs:
            done, _ = await asyncio.wait(futs, timeout=a.timeout * 2)
            ok = sum(1 for f in done if not f.cancelled() and f.exception() is None and f.result())
        return {"held": len(held), "alive": ok}

    print(json.dumps({"ready": True, "nofile": raise_nofile()}), flush=True)
    deadline = time.monotonic() + a.lifetime
    while time.monotonic() < deadline:
        try:
            line = await asyncio.wait_for(reader.readline(), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            break
        if not line:
            break
        cmd = line.decode().split()
        if not cmd:
            continue
        if cmd[0] == "open":
            out = await open_to(int(cmd[1]))
        elif cmd[0] == "check":
            out = await check()
        elif cmd[0] == "close":
            break
        else:
            out = {"error": f"unknown command {cmd[0]}"}
        print(json.dumps(out), flush=True)
    for p in held:
        if p.tr is not None:
            p.tr.close()
    await asyncio.sleep(0.2)
    return {"closed": len(held)}


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--proxy", help="proxy H:P; absent = no proxy")
        p.add_argument("--auth", help="user:pass for Proxy-Authorization: Basic")
        p.add_argument("--timeout", type=float, default=10.0)

    t = sub.add_parser("throughput")
    common(t)
    t.add_argument("--target", required=True)
    t.add_argument("--dir", choices=["up", "down"], required=True)
    t.add_argument("--bytes", type=int, default=2 << 30)
    t.set_defaults(timeout=120.0)

    n = sub.add_parser("tunnels")
    common(n)
    n.add_argument("--targets", required=True)
    n.add_argument("--sources", default="")
    n.add_argument("--workers", type=int, default=50)
    n.add_argument("--duration", type=float, default=10.0)
    n.add_argument("--max-conns", type=int, default=2_000_000)
    n.add_argument("--start-at", type=float, default=0.0, help="epoch time to start (multi-process sync)")
    n.add_argument("--raw", action="store_true", help="include raw latency samples")

    lat = sub.add_parser("latency")
    common(lat)
    lat.add_argument("--target", required=True)
    lat.add_argument("--requests", type=int, default=2000)
    lat.add_argument("--warmup", type=int, default=200)
    lat.add_argument("--max-seconds", type=float, default=60.0)

    h = sub.add_parser("hold")
    common(h)
    h.add_argument("--targets", required=True)
    h.add_argument("--sources", default="")
    h.add_argument("--concurrency", type=int, default=200)
    h.add_argument("--max-seconds", type=float, default=60.0, help="per open command")
    h.add_argument("--max-fails", type=int, default=400, help="per open command")
    h.add_argument("--lifetime", type=float, default=600.0, help="exit after this many seconds")
    h.set_defaults(timeout=5.0)

    a = ap.parse_args(argv)
    raise_nofile()
    if a.cmd == "throughput":
        out = cmd_throughput(a)
    elif a.cmd == "tunnels":
        out = _run_async(_tunnels, a)
    elif a.cmd == "latency":
        out = cmd_latency(a)
    else:
        out = _run_async(_hold, a)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
