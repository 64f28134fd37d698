#!/usr/bin/env python3
"""Instructions per operation: the user-space instructions a proxy process executes per
forwarded request, per CONNECT tunnel and per SOCKS5 tunnel, counted by valgrind's callgrind
(issue 27). Unlike seconds, the counts repeat whatever else the machine does, so they decide
every optimisation and guard against regressions (``tests/perf/test_instruction_budget.py``).

    .venv/bin/python bench/instructions.py [--ops N] [--kinds request,tunnel,socks]
        [--peers egressgate,egressgate-policy,egressgate-protect,egressgate-fleet,squid,tinyproxy,trafficserver,
                 dante,egressgate-blocks,egressgate-blocks-idle, any egressgate one + -compiled]
        [--out PATH] [--profile]

How it counts (every peer alike):

- the proxy runs under ``valgrind --tool=callgrind --trace-children=no`` (Dante, which forks
  its workers, with ``yes``, every process summed); the clients and the far ends run outside
  valgrind, in this process: a keep-alive origin answering a 100-byte body with nginx's header
  fields, and an echo server;
- one client does the operations one after the other: a keep-alive connection sending
  absolute-URI GETs (a new connection whenever the proxy closes one), or per tunnel: connect,
  CONNECT (SOCKS5: methods, credentials with policy, request), 200, a 16-byte echo, close
  (the client half-closes and waits for the proxy's close, so the next tunnel starts on an
  idle proxy);
- two copies of the proxy run side by side, one doing N operations and one 5N, started and
  stopped together (so periodic work, a function of the seconds alive, is the same in both);
  per operation = (Ir of 5N - Ir of N) / 4N: start-up, warm-up and shut-down cancel;
- ``PYTHONHASHSEED=0`` (hash order is part of the count) and
  ``GLIBC_TUNABLES=glibc.cpu.x86_rep_stosb_threshold=...:glibc.cpu.x86_rep_movsb_threshold=...``
  set high, so that glibc uses vector loops, not ``rep stosb``/``rep movsb``, which callgrind
  counts per byte (Squid clears a 64 KiB buffer per request);
- egressgate with ``log: {access: none}`` (as Squid's ``access_log none``); the policy variant
  is bench/peers.py's (Basic auth, 1,000 allow rules, a bound egress profile), the protect
  variant adds a ``protect`` rule on the target whose limits are never reached, the fleet
  variant leases that rule's budgets from a fleet store (a ``redis-server`` started for it); the
  blocks variants (not run unless named) add a provider with ``match``: on the target (``blocks``:
  every request and tunnel watched) or elsewhere (``blocks-idle``: the destination lookup alone).

Every egressgate peer also runs on the Cython-compiled build with ``-compiled`` appended to its
name (``egressgate-compiled``, ``egressgate-policy-compiled``, ...: ``.venv-compiled``, made by
``make compiled``; see setup.py); the targets table then has its rows for the compiled build too.

``--profile`` keeps the callgrind files (with ``--dump-instr=yes``) and prints, per operation,
the functions' inclusive and own instructions, start-up cancelled the same way (5N - N).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import platform
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import Env, Peer, ensure_packages, make_peers, which  # noqa: E402
from procs import Registry  # noqa: E402

KINDS = ["request", "tunnel", "socks"]
PEERS = ["egressgate", "egressgate-policy", "egressgate-protect", "egressgate-fleet", "squid", "tinyproxy",
         "trafficserver", "dante"]
KIND_LABEL = {
    "request": "forwarded plain-HTTP request (100-byte body, keep-alive)",
    "tunnel": "CONNECT tunnel: connect, CONNECT, 200, 16-byte echo, close",
    "socks": "SOCKS5 tunnel: connect, negotiate, request, 16-byte echo, close",
}
SOCKS_PEERS = ("egressgate", "dante")  # (prefixes) peers with a SOCKS5 listener
HTTP_PEERS = ("egressgate", "squid", "tinyproxy", "trafficserver")
# issue 27's table: round 1 (2a11ef5) and main when the issue was filed, per operation
ROUND1 = {"request": 164_000, "tunnel": 261_000}
ISSUE_MAIN = {"request": 213_000, "tunnel": 332_000}
BUDGETS = Path(__file__).resolve().parent / "budgets.json"
HUGE = "0xffffffffffffffff"
ENV = {
    "PYTHONHASHSEED": "0",
    "GLIBC_TUNABLES": f"glibc.cpu.x86_rep_stosb_threshold={HUGE}:glibc.cpu.x86_rep_movsb_threshold={HUGE}",
}
PING = b"0123456789abcdef"
BODY = b"x" * 99 + b"\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 02:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n" + BODY
)
IO_TIMEOUT = 120.0  # seconds a client waits for a proxy under valgrind (~50x slower than native)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- far ends


class FarEnds:
    """The origin (keep-alive, a fixed 100-byte response) and the echo server, on threads of
    this process: they are not counted, only the proxy is."""

    def __init__(self) -> None:
        self.origin = self._listen()
        self.echo = self._listen()
        self.sink = self._listen()  # (a CONNECT port nobody uses: Env wants one)
        self.origin_port = self.origin.getsockname()[1]
        self.echo_port = self.echo.getsockname()[1]
        self.closed = False
        for sock, serve in ((self.origin, self._origin_conn), (self.echo, self._echo_conn)):
            threading.Thread(target=self._accept, args=(sock, serve), daemon=True).start()

    @staticmethod
    def _listen() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(512)
        return s

    def env(self, tmp: Path) -> Env:
        return Env(tmp, self.origin_port, self.sink.getsockname()[1], [self.echo_port])

    def _accept(self, lsock: socket.socket, serve) -> None:
        while not self.closed:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _origin_conn(conn: socket.socket) -> None:
        buf = b""
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:  # (GETs: no body)
                    _, buf = buf.split(b"\r\n\r\n", 1)
                    conn.sendall(RESPONSE)
        except OSError:
            pass
        finally:
            conn.close()

    @staticmethod
    def _echo_conn(conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.closed = True
        for s in (self.origin, self.echo, self.sink):
            s.close()


# ---------------------------------------------------------------------------- clients


class Reader:
    """Buffered reads from a blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError(f"the proxy closed the connection (after {self.buf[:200]!r})")
        self.buf += data

    def until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            self._more()
        out, self.buf = self.buf.split(marker, 1)
        return out + marker

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def until_eof(self) -> None:
        while self.sock.recv(65536):
            pass


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _auth_header(auth: str | None) -> bytes:
    if not auth:
        return b""
    return b"Proxy-Authorization: Basic " + base64.b64encode(auth.encode()) + b"\r\n"


def do_requests(port: int, n: int, origin_port: int, auth: str | None) -> int:
    """n sequential GETs on one keep-alive connection (a new one whenever the proxy closes it);
    returns how many connections it took."""
    origin = f"127.0.0.1:{origin_port}".encode()
    req = (b"GET http://" + origin + b"/ HTTP/1.1\r\nHost: " + origin + b"\r\nUser-Agent: bench/1\r\n"
           b"Accept: */*\r\n" + _auth_header(auth) + b"\r\n")
    sock, rd, conns = None, None, 0
    try:
        for _ in range(n):
            fresh = sock is None
            if fresh:
                sock = _connect(port)
                rd, conns = Reader(sock), conns + 1
            try:
                sock.sendall(req)
                head = rd.until(b"\r\n\r\n")
            except (ConnectionError, BrokenPipeError):
                if fresh or rd.buf:  # a proxy that closes an idle keep-alive connection without
                    raise  # "Connection: close" (tinyproxy): the request goes on a new one
                sock.close()
                sock = _connect(port)
                rd, conns = Reader(sock), conns + 1
                sock.sendall(req)
                head = rd.until(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
                raise RuntimeError(f"request refused: {head[:200]!r}")
            m = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
            if not m or rd.exactly(int(m.group(1))) != BODY:
                raise RuntimeError(f"unexpected response: {head[:300]!r}")
            if re.search(rb"\r\nconnection:\s*close", head, re.I) or head.startswith(b"HTTP/1.0"):
                rd.until_eof()
                sock.close()
                sock = None
    finally:
        if sock is not None:
            sock.shutdown(socket.SHUT_WR)
            try:
                Reader(sock).until_eof()
            except OSError:
                pass
            sock.close()
    return conns


def _echo_and_close(sock: socket.socket, rd: Reader) -> None:
    sock.sendall(PING)
    if rd.exactly(len(PING)) != PING:
        raise RuntimeError("the echo came back wrong")
    sock.shutdown(socket.SHUT_WR)  # then wait for the proxy's close: the tunnel is gone before the next
    rd.until_eof()
    sock.close()


def do_tunnels(port: int, n: int, echo_port: int, auth: str | None) -> None:
    authority = f"127.0.0.1:{echo_port}".encode()
    req = b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n" + _auth_header(auth) + b"\r\n"
    for _ in range(n):
        sock = _connect(port)
        rd = Reader(sock)
        sock.sendall(req)
        head = rd.until(b"\r\n\r\n")
        if not re.match(rb"HTTP/1\.[01] 200", head):
            raise RuntimeError(f"CONNECT refused: {head[:200]!r}")
        _echo_and_close(sock, rd)


def do_socks(port: int, n: int, echo_port: int, auth: str | None) -> None:
    """SOCKS5 as curl does it: each step waits for the server's answer."""
    request = b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", echo_port)
    for _ in range(n):
        sock = _connect(port)
        rd = Reader(sock)
        if auth:
            user, password = (x.encode() for x in auth.split(":", 1))
            sock.sendall(b"\x05\x01\x02")
            if rd.exactly(2) != b"\x05\x02":
                raise RuntimeError("SOCKS5: user/password not chosen")
            sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
            if rd.exactly(2) != b"\x01\x00":
                raise RuntimeError("SOCKS5: credentials refused")
        else:
            sock.sendall(b"\x05\x01\x00")
            if rd.exactly(2) != b"\x05\x00":
                raise RuntimeError("SOCKS5: no-auth not chosen")
        sock.sendall(request)
        reply = rd.exactly(10)
        if reply[:2] != b"\x05\x00":
            raise RuntimeError(f"SOCKS5 request refused: {reply!r}")
        _echo_and_close(sock, rd)


def run_ops(kind: str, peer: Peer, n: int, far: FarEnds) -> None:
    if kind == "request":
        do_requests(peer.port, n, far.origin_port, peer.auth)
    elif kind == "tunnel":
        do_tunnels(peer.port, n, far.echo_port, peer.auth)
    else:
        do_socks(peer.socks_port, n, far.echo_port, peer.auth)


# ---------------------------------------------------------------------------- valgrind


def valgrind_available() -> str | None:
    """None when valgrind can run here, else why not."""
    if not which("valgrind"):
        return "valgrind is not installed (apt-get install valgrind)"
    return None


def callgrind_argv(out_prefix: Path, children: bool, instr: bool = False) -> list[str]:
    return [which("valgrind") or "valgrind", "--tool=callgrind", f"--callgrind-out-file={out_prefix}.%p",
            f"--trace-children={'yes' if children else 'no'}", f"--dump-instr={'yes' if instr else 'no'}",
            f"--log-file={out_prefix}.log.%p"]


def total_ir(path: Path) -> int:
    """The total instructions (Ir) of one callgrind output file."""
    text = path.read_text(errors="replace")
    m = re.search(r"^totals:\s*(\d+)", text, re.M) or re.search(r"^summary:\s*(\d+)", text, re.M)
    if not m:
        raise RuntimeError(f"no totals in {path}")
    return int(m.group(1))


def supports(peer_name: str, kind: str) -> bool:
    return peer_name.startswith(SOCKS_PEERS if kind == "socks" else HTTP_PEERS)


class Run:
    """One proxy under callgrind doing ``n`` operations."""

    def __init__(self, peer: Peer, n: int, tmp: Path, tag: str, instr: bool) -> None:
        self.peer, self.n = peer, n
        self.prefix = tmp / f"callgrind.{peer.name}.{tag}"
        self.children = peer.name == "dante"
        peer.wrap = callgrind_argv(self.prefix, self.children, instr)
        peer.env = ENV
        peer.start_timeout = 600.0
        self.error: BaseException | None = None

    def files(self) -> list[Path]:
        pid = self.peer.proc.pid if self.peer.proc is not None else None
        out = [p for p in self.prefix.parent.glob(self.prefix.name + ".*")
               if re.fullmatch(re.escape(self.prefix.name) + r"\.\d+", p.name)]
        if not self.children:
            out = [p for p in out if p.suffix == f".{pid}"]
        return out


def _in_threads(fns) -> list[BaseException]:
    errors: list[BaseException] = []

    def call(fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=call, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def measure(peer_name: str, kind: str, n: int, far: FarEnds, tmp: Path, instr: bool = False,
            keep: bool = False) -> dict:
    """Instructions per ``kind`` operation of ``peer_name``: (Ir(5n) - Ir(n)) / 4n."""
    reg = Registry()
    runs = []
    for tag, count in (("n", n), ("5n", 5 * n)):
        peer = make_peers([peer_name], None)[0]
        if kind == "socks" and peer_name.startswith("egressgate"):
            peer.socks = True
        runs.append(Run(peer, count, tmp, tag, instr))
    env = far.env(tmp)
    t0 = time.monotonic()
    try:
        errors = _in_threads([lambda r=r: r.peer.start(reg, env) for r in runs])
        if errors:
            raise errors[0]
        for r in runs:  # callgrind writes at exit into the file it made at start, as root; a
            for f in r.files():  # proxy that drops privileges (Squid) could not write its counts
                f.chmod(0o666)
        started = time.monotonic()
        errors = _in_threads([lambda r=r: run_ops(kind, r.peer, r.n, far) for r in runs])
        if errors:
            raise errors[0]
        ops_s = time.monotonic() - started
        _in_threads([lambda r=r: reg.stop(r.peer.proc, grace=120.0) for r in runs])
        irs = []
        for r in runs:
            files = r.files()
            if not files:
                raise RuntimeError(f"{peer_name}: no callgrind output (see {r.prefix}.log.*)")
            irs.append(sum(total_ir(f) for f in files))
        out = {
            "n": n,
            "ir_n": irs[0],
            "ir_5n": irs[1],
            "per_op": (irs[1] - irs[0]) / (4 * n),
            "seconds": round(time.monotonic() - t0, 1),
            "ops_seconds": round(ops_s, 1),
        }
        if instr or keep:
            out["files"] = [[str(f) for f in r.files()] for r in runs]
        return out
    finally:
        reg.stop_all()
        if not (instr or keep):
            for r in runs:
                for f in r.prefix.parent.glob(r.prefix.name + ".*"):
                    f.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- profile


def function_costs(path: Path, inclusive: bool) -> dict[str, int]:
    """Per function Ir from callgrind_annotate (inclusive or own)."""
    argv = ["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}", "--threshold=100", str(path)]
    text = subprocess.run(argv, capture_output=True, text=True, timeout=600).stdout
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+)\s+(?:\([\s\d.%]+\)\s+)?(?:\*\s+)?(.+)$", line)
        if m and ":" in m.group(2):
            name = m.group(2).split(" [", 1)[0].strip()
            out[name] = out.get(name, 0) + int(m.group(1).replace(",", ""))
    return out


# Where a proxy's instructions go, by component: the first pattern a function's file matches.
COMPONENTS = (
    ("CPython bytecode loop", re.compile(r"Python/ceval|pycore_ceval|Python/frame\.c|pycore_frame")),
    ("CPython calls, objects, memory, GC", re.compile(r"Python-3\.\d+\.\d+/(\./)?(Objects|Python|Include|Modules)/")),
    ("uvloop (Cython event loop)", re.compile(r"uvloop")),
    ("libuv", re.compile(r"libuv")),
    ("httptools / llhttp", re.compile(r"httptools|llhttp|http-parser|http_parser")),
    ("glibc (memcpy, malloc, printf of addresses, syscall stubs)",
     re.compile(r"sysdeps|/glibc|libc|nptl|malloc|string/|stdio-common|libio|inet/|resolv/")),
)


def components_table(own: dict[str, float]) -> str:
    """Own instructions per operation summed by component (``COMPONENTS``), largest first."""
    sums: dict[str, float] = {}
    for name, v in own.items():
        where = next((label for label, pat in COMPONENTS if pat.search(name)), "other (our compiled modules, ...)")
        sums[where] = sums.get(where, 0.0) + v
    total = sum(sums.values()) or 1.0
    lines = ["## own instructions per operation, by component", "", "| component | per operation | share |",
             "|---|---:|---:|"]
    lines += [f"| {k} | {v:,.0f} | {v / total:.0%} |" for k, v in sorted(sums.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines + [""])


def profile_table(res: dict, top: int = 40) -> str:
    """Functions by instructions per operation (inclusive and own), 5N - N over 4N."""
    (small,), (big,) = ([Path(f) for f in fs] for fs in res["files"])
    n = res["n"]
    lines = []
    for inclusive in (True, False):
        a, b = function_costs(small, inclusive), function_costs(big, inclusive)
        per = {k: (b.get(k, 0) - a.get(k, 0)) / (4 * n) for k in set(a) | set(b)}
        rows = sorted(per.items(), key=lambda kv: -kv[1])[:top]
        lines += [f"## {'inclusive' if inclusive else 'own'} instructions per operation", ""]
        lines += [f"{v:>12,.0f}  {k}" for k, v in rows] + [""]
        if not inclusive:
            lines.append(components_table(per))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- report


def _fmt_k(x: float | None) -> str:
    return "—" if x is None else f"{x / 1000:,.1f} k"


def _ratio(a, b) -> str:
    return "—" if not a or not b else f"{a / b:.2f}×"


def per_op(results: dict, peer: str, kind: str) -> float | None:
    r = results.get(peer, {}).get(kind)
    return r.get("per_op") if isinstance(r, dict) else None


def tables(results: dict, labels: dict[str, str]) -> str:
    out = []
    for kind in KINDS:
        peers = [p for p in results if per_op(results, p, kind) is not None or
                 isinstance(results[p].get(kind), dict)]
        if not peers:
            continue
        squid = per_op(results, "squid", kind)
        ats = per_op(results, "trafficserver", kind)
        out += [f"### Instructions per {KIND_LABEL[kind]}", "",
                "| peer | instructions | vs Squid | vs Traffic Server | vs round 1 (2a11ef5) | vs issue 27's main |",
                "|---|---:|---:|---:|---:|---:|"]
        for p in peers:
            r = results[p][kind]
            if "error" in r:
                out.append(f"| {labels.get(p, p)} | error: {r['error'][:120]} | | | | |")
                continue
            v = r["per_op"]
            eg = p.startswith("egressgate")
            out.append(f"| {labels.get(p, p)} | {_fmt_k(v)} | {_ratio(v, squid) if p != 'squid' else ''} | "
                       f"{_ratio(v, ats) if p != 'trafficserver' else ''} | "
                       f"{_ratio(v, ROUND1.get(kind)) if eg and kind in ROUND1 else ''} | "
                       f"{_ratio(v, ISSUE_MAIN.get(kind)) if eg and kind in ISSUE_MAIN else ''} |")
        out.append("")
    return "\n".join(out)


def targets(results: dict) -> list[dict]:
    """Issue 27's instruction targets."""
    out = []

    def add(what, measured, goal, ok):
        out.append({"target": what, "measured": measured, "goal": goal,
                    "status": "n/a" if ok is None else ("pass" if ok else "FAIL")})

    def ratio(a, b):
        return None if a is None or not b else a / b

    for build in ("", "-compiled"):  # the pure build, then the compiled one (when measured)
        tag = " (compiled)" if build else ""
        if build and not any(p.endswith(build) for p in results):
            continue
        for kind, k in (("request", 0.5), ("tunnel", 0.8)):
            x = ratio(per_op(results, "egressgate" + build, kind), per_op(results, "squid", kind))
            add(f"instructions per {kind} <= {k} x Squid's{tag}", x, k, None if x is None else x <= k)
        for kind in KINDS:
            off = per_op(results, "egressgate" + build, kind)
            for variant, k in (("policy", 1.10), ("protect", 1.15)):
                x = ratio(per_op(results, f"egressgate-{variant}{build}", kind), off)
                add(f"{variant} on: instructions per {kind} <= {k:.2f} x off{tag}", x, k,
                    None if x is None else x <= k)
            # (no goal: what leasing budgets from a fleet store adds to protect, stated beside it)
            x = ratio(per_op(results, f"egressgate-fleet{build}", kind),
                      per_op(results, f"egressgate-protect{build}", kind))
            add(f"fleet store on (fleet.redis): instructions per {kind} vs protect alone{tag}", x, None, None)
        if build:  # what compiling saves, per kind (no goal)
            for kind in KINDS:
                x = ratio(per_op(results, "egressgate" + build, kind), per_op(results, "egressgate", kind))
                add(f"compiled vs pure: instructions per {kind}", x, None, None)
    return out


def targets_table(rows: list[dict]) -> str:
    lines = ["| target | measured | status |", "|---|---:|---|"]
    for t in rows:
        m = "—" if t["measured"] is None else f"{t['measured']:.2f}×"
        lines.append(f"| {t['target']} | {m} | {t['status']} |")
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    meta = doc["meta"]
    return "\n".join([
        "## Instructions per operation (valgrind callgrind; user space of the proxy process)", "",
        f"{meta['date']} · valgrind {meta['valgrind']} · Python {meta['python']} · N = {meta['ops']} and 5N; "
        "per operation = (Ir(5N) − Ir(N)) / 4N", "",
        tables(doc["results"], doc["labels"]),
        "### Instruction targets (issue 27)", "",
        targets_table(doc["targets"]), "",
    ])


def collect(peers: list[str], kinds: list[str], ops: int, log=log, instr: bool = False,
            keep_tmp: bool = False) -> dict:
    """Measure every (peer, kind) that applies; the document bench/run.py and main() report."""
    tmp = Path(tempfile.mkdtemp(prefix="egressgate-instructions-"))
    os.chmod(tmp, 0o755)  # (Squid and tinyproxy drop privileges)
    far = FarEnds()
    results: dict = {}
    labels: dict = {}
    try:
        for name in peers:
            peer = make_peers([name], None)[0]
            labels[name] = peer.label
            why = peer.unavailable()
            results[name] = {}
            for kind in kinds:
                if not supports(name, kind):
                    continue
                if why:
                    results[name][kind] = {"error": why}
                    continue
                log(f"   {peer.label}: {kind} ×{ops} and ×{5 * ops} under callgrind ...")
                try:
                    r = measure(name, kind, ops, far, tmp, instr=instr, keep=keep_tmp)
                except Exception as e:  # one failed peer must not lose the others
                    r = {"error": f"{type(e).__name__}: {e}"}
                    log(f"      error: {r['error']}")
                else:
                    log(f"      {r['per_op']:,.0f} instructions per {kind} ({r['seconds']:.0f}s)")
                results[name][kind] = r
    finally:
        far.close()
        if not (instr or keep_tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    doc = {
        "meta": {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "ops": ops,
                 "valgrind": _valgrind_version(), "python": platform.python_version(), "env": ENV,
                 "tmp": str(tmp) if (instr or keep_tmp) else None},
        "results": results,
        "labels": labels,
    }
    doc["targets"] = targets(results)
    return doc


def _valgrind_version() -> str:
    try:
        return subprocess.run(["valgrind", "--version"], capture_output=True, text=True,
                              timeout=10).stdout.strip().removeprefix("valgrind-")
    except OSError:
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=200, help="N (the second copy does 5N)")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--out", default=None, help="results path without extension (.json and .md)")
    ap.add_argument("--profile", action="store_true", help="per-function instructions per operation")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the callgrind files")
    a = ap.parse_args(argv)
    kinds = [k for k in a.kinds.split(",") if k]
    peers = [p for p in a.peers.split(",") if p]
    for k in kinds:
        if k not in KINDS:
            ap.error(f"unknown kind {k!r}")
    why = valgrind_available()
    ensure_packages({"valgrind", *(["squid"] if "squid" in peers else []),
                     *(["tinyproxy"] if "tinyproxy" in peers else []),
                     *(["traffic_server"] if "trafficserver" in peers else []),
                     *(["danted"] if "dante" in peers else [])}, log)
    why = valgrind_available()
    if why:
        log(why)
        return 2
    doc = collect(peers, kinds, a.ops, instr=a.profile, keep_tmp=a.keep_tmp)
    md = markdown(doc)
    print(md)
    if a.profile:
        for name, by_kind in doc["results"].items():
            for kind, r in by_kind.items():
                if "files" in r:
                    print(f"# {name} {kind}\n")
                    print(profile_table(r))
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
        out.with_suffix(".md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
