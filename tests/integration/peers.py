"""Real loopback peers for integration tests: an HTTP/1.1 origin (plain or TLS), the pieces
test servers are made of (QuietHandler, HTTPPeer, Acceptor), a TCP echo server, an allowlisting
provider, and the gateway itself as a subprocess; and the client side every test shares (raw
CONNECT tunnels: open_tunnel/request_tunnel; one head: read_head). No mocks: every byte
crosses a real socket."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import yaml

BLOCK = bytes(range(256)) * 256  # 64 KiB of a known pattern


def pattern_bytes(n: int):
    """Yield n bytes of the known pattern, in 64 KiB blocks."""
    full, rest = divmod(n, len(BLOCK))
    for _ in range(full):
        yield BLOCK
    if rest:
        yield BLOCK[:rest]


def pattern_sha256(n: int) -> str:
    h = hashlib.sha256()
    for block in pattern_bytes(n):
        h.update(block)
    return h.hexdigest()


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler for a loopback peer: HTTP/1.1 (keep-alive), no log lines."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def reply(self, status: int, body: bytes = b"", headers: dict | None = None, reason: str | None = None) -> None:
        """One answer with a Content-Length (the body left out for HEAD)."""
        self.send_response(status, reason)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def query(self) -> tuple[str, dict[str, str]]:
        """The request's path and its query's first values."""
        url = urlsplit(self.path)
        return url.path, {k: v[0] for k, v in parse_qs(url.query).items()}


def asked_answer(q: dict[str, str]) -> tuple[int, dict[str, str]]:
    """What ``/answer?code=N&retry_after=V`` asks for: (N, a Retry-After of V when given)."""
    return int(q.get("code", "200")), ({"Retry-After": q["retry_after"]} if "retry_after" in q else {})


class HTTPPeer:
    """A ``ThreadingHTTPServer`` on ``host`` (any port) answering with ``handler`` in a daemon
    thread, TLS when ``tls`` is given; ``close`` stops it."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1",
                 tls: ssl.SSLContext | None = None) -> None:
        self.server = ThreadingHTTPServer((host, 0), handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.host = host
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Allowlist(HTTPPeer):
    """A provider whose allowlist the test changes while the gateway runs: to HEAD or GET, 200
    for a source address in ``allowed``, 403 naming it for any other; no answer at all (until
    ``stalled`` no longer holds it, 10 s at most) for an address in ``stalled``. ``hits``: the
    source address of every check. ``url``: its check URL."""

    def __init__(self, *allowed: str) -> None:
        self.allowed = set(allowed)
        self.stalled: set[str] = set()
        self.hits: list[str] = []
        owner = self

        class Handler(QuietHandler):
            def do_HEAD(self) -> None:
                source = self.client_address[0]
                owner.hits.append(source)
                deadline = time.monotonic() + 10
                while source in owner.stalled and time.monotonic() < deadline:
                    time.sleep(0.02)
                ok = source in owner.allowed
                self.reply(200 if ok else 403, reason=None if ok else f"{source} not allowlisted")

            do_GET = do_HEAD

        super().__init__(Handler)
        self.url = f"http://127.0.0.1:{self.port}/ping"

    def close(self) -> None:
        self.stalled.clear()
        super().close()


class OriginHandler(QuietHandler):
    server_version = "origin/1"

    def _send(self, status: int, body: bytes, ctype: str = "text/plain", extra: dict | None = None) -> None:
        self.reply(status, body, {"Content-Type": ctype, **(extra or {})})

    def _read_body(self) -> tuple[int, str]:
        h = hashlib.sha256()
        n = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = size
                while left:
                    data = self.rfile.read(min(left, 1 << 20))
                    h.update(data)
                    n += len(data)
                    left -= len(data)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                data = self.rfile.read(min(left, 1 << 20))
                if not data:
                    break
                h.update(data)
                n += len(data)
                left -= len(data)
        return n, h.hexdigest()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/ip":
            self._send(200, self.client_address[0].encode())
        elif url.path == "/peer":
            self._send(200, f"{self.client_address[0]}:{self.client_address[1]}".encode())
        elif url.path == "/headers":
            doc = {"request_line": self.requestline, "headers": [[k, v] for k, v in self.headers.items()]}
            self._send(200, json.dumps(doc).encode(), "application/json")
        elif url.path == "/bytes":
            n = int(q.get("n", "1024"))
            delay = float(q.get("delay", "0"))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            if q.get("mode") == "chunked":
                self.send_header("Transfer-Encoding", "chunked")
            elif q.get("mode") == "close":
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(n))
            self.end_headers()
            if self.command == "HEAD":
                return
            for block in pattern_bytes(n):
                if delay:
                    time.sleep(delay)
                if q.get("mode") == "chunked":
                    self.wfile.write(b"%x\r\n" % len(block) + block + b"\r\n")
                else:
                    self.wfile.write(block)
            if q.get("mode") == "chunked":
                self.wfile.write(b"0\r\n\r\n")
        elif url.path == "/slow":
            time.sleep(float(q.get("delay", "1")))
            self._send(200, b"slow\n")
        elif url.path == "/answer":  # a provider's refusal, e.g. /answer?code=429&retry_after=60
            status, extra = asked_answer(q)
            self._send(status, f"{q.get('code', '200')}\n".encode(), extra=extra)
        elif url.path == "/only-from":
            allowed = q.get("addr", "127.0.0.2")
            if self.client_address[0] == allowed:
                self._send(200, b"welcome\n")
            else:
                self._send(403, f"{self.client_address[0]} is not allowlisted\n".encode())
        else:
            self._send(200, f"hello {url.path}\n".encode())

    do_HEAD = do_GET

    def do_POST(self) -> None:
        n, digest = self._read_body()
        self._send(200, json.dumps({"bytes": n, "sha256": digest, "method": self.command}).encode(),
                   "application/json")

    do_PUT = do_POST
    do_PATCH = do_POST
    do_DELETE = do_POST


class Origin(HTTPPeer):
    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        super().__init__(OriginHandler, host, tls)
        self.scheme = "https" if tls else "http"

    def url(self, path: str = "/", host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.host}:{self.port}{path}"


class Acceptor:
    """A TCP listener on ``host`` (any port) accepting in a daemon thread: each connection goes
    to ``accepted(conn, addr)`` (a subclass's), until ``close``. A subclass sets what
    ``accepted`` uses before calling ``__init__``: accepting starts there."""

    def __init__(self, host: str = "127.0.0.1", backlog: int | None = None) -> None:
        self.sock = socket.create_server((host, 0), backlog=backlog)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.address = f"{host}:{self.port}"
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, addr = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted(conn, addr)

    def accepted(self, conn: socket.socket, addr: tuple) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop = True
        self.sock.close()


class EchoServer(Acceptor):
    """TCP echo: echoes until the client's EOF, then half-closes its side too."""

    def __init__(self, host: str = "127.0.0.1", greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.peers: list[str] = []
        super().__init__(host)

    def accepted(self, conn: socket.socket, addr: tuple) -> None:
        self.peers.append(addr[0])
        threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            if self.greeting:
                conn.sendall(self.greeting)
            while True:
                try:
                    data = conn.recv(1 << 16)
                except OSError:
                    return
                if not data:
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_WR)
                    return
                conn.sendall(data)


class GatewayProcess:
    """``egressgate serve`` in a subprocess; access-log lines and events collected."""

    def __init__(self, config: dict, tmp: Path, env: dict | None = None, ready_timeout: float = 20.0,
                 read_stdout: bool = True, config_path: Path | None = None, args: tuple[str, ...] = ()) -> None:
        """``read_stdout=False``: nobody reads the gateway's stdout pipe (a stalled log reader);
        ``proc.stdout`` is left to the test. ``config_path``: serve the file the test laid out
        there (``config`` is then not written). ``args``: more ``serve`` options (e.g. --pidfile)."""
        if config_path is None:
            self.config_path = tmp / f"egressgate-{time.monotonic_ns()}.yaml"
            self.write_config(config)
        else:
            self.config_path = config_path
        self.log: list[dict] = []
        self.raw_stdout: list[str] = []
        self.events: list[dict] = []
        self.stderr_lines: list[str] = []
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "egressgate", "serve", "--config", str(self.config_path), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env)
        self._started = threading.Event()
        if read_stdout:
            threading.Thread(target=self._read_stdout, daemon=True).start()
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()
        deadline = time.monotonic() + ready_timeout
        while not self._started.wait(0.05):
            if self.proc.poll() is not None:
                self._stderr_reader.join(5)  # the pipe is at EOF: everything it printed is read
                break
            if time.monotonic() > deadline:
                break
        if not self._started.is_set():
            how = f"exited with {self.proc.returncode}" if self.proc.poll() is not None \
                else f"no started event within {ready_timeout:g}s"
            self.kill()
            raise RuntimeError(f"gateway did not start ({how}):\n" + "".join(self.stderr_lines[-30:]))
        # With several workers each prints a started event; worker 0 owns the admin listener.
        started = next(e for e in self.events if e.get("event") == "started" and e.get("worker", 0) == 0)
        self.started_event = started
        self.address = started["listen"][0]
        self.host, port = self.address.rsplit(":", 1)
        self.port = int(port)
        self.url = f"http://{self.address}"
        self.admin = f"http://{started['admin']}" if started.get("admin") else None
        self.pid = self.proc.pid

    def write_config(self, config: dict | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        self.config_path.write_text(text)

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            self.raw_stdout.append(line.decode(errors="replace"))
            with contextlib.suppress(ValueError):
                self.log.append(json.loads(line))

    def stdout_lines(self) -> list[str]:
        return list(self.raw_stdout)

    def _read_stderr(self) -> None:
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.stderr_lines.append(line)
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            self.events.append(doc)
            if doc.get("event") == "started" and doc.get("worker", 0) == 0:
                self._started.set()

    def wait_log(self, predicate, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rec in list(self.log):
                if predicate(rec):
                    return rec
            time.sleep(0.02)
        raise AssertionError(f"no access-log record matched; have {self.log[-5:]}")

    def wait_event(self, name: str, timeout: float = 10.0, after: int = 0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for doc in self.events[after:]:
                if doc.get("event") == name:
                    return doc
            time.sleep(0.02)
        raise AssertionError(f"no {name} event; stderr: {''.join(self.stderr_lines[-10:])}")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def base_config(**overrides) -> dict:
    cfg = {
        "listen": [{"address": "127.0.0.1:0"}],
        "admin": {"address": "127.0.0.1:0"},
        "security": {"allow_private": ["127.0.0.0/8", "::1/128"], "connect_ports": [443]},
        # tests tag their requests with query strings (?t=...) and find them in the access log by
        # them; the default (off) is tested in test_admin_browser
        "log": {"full_targets": True},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def raw_exchange(address: str, data: bytes, timeout: float = 10.0, read_until_close: bool = True) -> bytes:
    """Send raw bytes to the gateway and return its answer.

    ``read_until_close`` (the default): everything until the gateway closes the connection,
    which it must do (EOF or reset) within ``timeout`` seconds -- otherwise this fails, so a
    test that says "the connection is closed" cannot pass against a gateway that keeps it
    open. ``read_until_close=False``: one complete response with a Content-Length (or no
    body), which must arrive within ``timeout`` seconds; the connection may stay open."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        chunks: list[bytes] = []
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                got = b"".join(chunks)
                what = "close the connection" if read_until_close else "send a complete response"
                raise AssertionError(f"the gateway did not {what} within {timeout:g}s; got {got[:300]!r}") from None
            except ConnectionResetError:
                break  # closed by a reset: closed all the same
            if not chunk:
                break
            chunks.append(chunk)
            if not read_until_close and _complete(b"".join(chunks)):
                break
        return b"".join(chunks)


def connect(address: str, source: str | None = None, timeout: float = 5.0) -> socket.socket:
    """A TCP connection to ``host:port``, from ``source`` (bound, any port) when given."""
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(timeout)
    if source is not None:
        s.bind((source, 0))
    s.connect((host, int(port)))
    return s


def basic_auth(user: str, password: str) -> str:
    """A ``Proxy-Authorization`` value: ``Basic`` and the base64 of ``user:password``."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def read_head(sock: socket.socket, timeout: float | None = None, *, partial: bool = False) -> bytes:
    """One HTTP head, through its blank line, read byte by byte: whatever follows it (a body,
    tunnelled bytes) stays in the socket. Fails, saying what did arrive, when nothing
    completes the head within the socket's timeout (``timeout`` seconds when given), or when
    the connection ends first -- unless ``partial``: then what arrived (maybe nothing)."""
    if timeout is not None:
        sock.settimeout(timeout)
    head = b""
    while b"\r\n\r\n" not in head:
        try:
            chunk = sock.recv(1)
        except TimeoutError:
            raise AssertionError(f"no complete head within {sock.gettimeout():g}s; got {head!r}") from None
        if not chunk and partial:
            break
        assert chunk, f"the connection ended before a complete head; got {head!r}"
        head += chunk
    return head


def get_status(gw, url: str, out: list) -> None:
    """One ``GET url`` through ``gw`` on a new connection (a thread's target): its status goes
    to ``out`` -- 0 when the answer is no HTTP/1.1 head, -1 when the connection failed."""
    try:
        s = socket.create_connection((gw.host, gw.port), timeout=30)
    except OSError:
        out.append(-1)
        return
    try:
        s.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        head = read_head(s, partial=True)
        out.append(int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0)
    except OSError:
        out.append(-1)
    finally:
        s.close()


def join_all(threads: list[threading.Thread], timeout: float = 30.0) -> None:
    """Wait for each thread (``timeout`` seconds each at most); fail if one still runs."""
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a request hung"


def first_kept_alive(sock: socket.socket, origin) -> bytes:
    """``GET /first`` from ``origin`` on ``sock``: the whole answer, which must be a 200 that
    keeps the connection alive."""
    sock.sendall(f"GET {origin.url('/first')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    first = b""
    while not first.endswith(b"hello /first\n"):
        chunk = sock.recv(65536)
        assert chunk, first
        first += chunk
    assert first.startswith(b"HTTP/1.1 200 ") and b"Connection: keep-alive" in first, first
    return first


def burst(gws: list, url: str, n: int) -> tuple[list[int], list[threading.Thread]]:
    """``n`` ``get_status`` at once, each in its own (started) thread, spread over the gateways
    ``gws`` in turn: (the list their statuses go to, the threads)."""
    statuses: list[int] = []
    threads = [threading.Thread(target=get_status, args=(gws[i % len(gws)], url, statuses), daemon=True)
               for i in range(n)]
    for t in threads:
        t.start()
    return statuses, threads


def request_tunnel(gw, dest: str, *, headers: dict[str, str] | None = None, early: bytes = b"",
                   source: str | None = None, timeout: float = 10.0) -> tuple[socket.socket, bytes]:
    """Send ``CONNECT dest`` to ``gw`` (a GatewayProcess or a ``host:port``) on a new
    connection and read the answer's head: (the socket, the head). ``headers``: the request's
    header fields (default ``Host: dest``; ``{}`` for none). ``early``: bytes sent right after
    the request, before any answer. ``source``: the client's address. ``timeout``: the
    socket's."""
    address = gw if isinstance(gw, str) else gw.address
    fields = {"Host": dest} if headers is None else headers
    s = connect(address, source, timeout)
    try:
        s.sendall(f"CONNECT {dest} HTTP/1.1\r\n".encode()
                  + b"".join(f"{k}: {v}\r\n".encode() for k, v in fields.items()) + b"\r\n" + early)
        return s, read_head(s)
    except BaseException:
        s.close()
        raise


def open_tunnel(gw, dest: str, *, headers: dict[str, str] | None = None, early: bytes = b"",
                source: str | None = None, timeout: float = 10.0, expect: bytes = b"HTTP/1.1 200 ") -> socket.socket:
    """``request_tunnel``, and its answer must start with ``expect`` (an established tunnel
    unless told otherwise): the socket, positioned right after the head."""
    s, head = request_tunnel(gw, dest, headers=headers, early=early, source=source, timeout=timeout)
    if not head.startswith(expect):
        s.close()
        raise AssertionError(head)
    return s


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            return len(body) >= int(v)
    return True


class ClosedPort:
    """A loopback TCP port where connections are refused, held for as long as this object
    lives: a socket bound to it that never listens, so no other socket can take the number
    (the old way -- bind port 0, close, reuse the number -- races with anything else binding)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.bind((host, 0))
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.address = f"{host}:{self.port}"

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ClosedPort:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ReservedPort(ClosedPort):
    """A port kept for processes that bind it with SO_REUSEPORT (the gateway's workers): held
    by a bound socket that also sets SO_REUSEPORT and never listens, so only sockets of this
    user that set it too can bind the number, and no connection is ever routed to the holder.
    Close it once the processes it was kept for are listening."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sock.bind((host, 0))
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.address = f"{host}:{self.port}"


def settled_fds(gw: GatewayProcess, baseline: int, within: float = 10.0) -> int:
    """The gateway's descriptor count once it has come back to ``baseline`` (or after
    ``within`` seconds)."""
    deadline = time.monotonic() + within
    n = gw.fd_count()
    while n > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
        n = gw.fd_count()
    return n


def wait_for(predicate, what: str, timeout: float = 10.0, interval: float = 0.02):
    """Poll ``predicate`` until it returns something truthy (returned); fail loudly, naming
    ``what``, after ``timeout`` seconds. For waiting on a state, never for time to pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class Tripwire:
    """A listener on an address the gateway must never connect to (say, one the address guard
    refuses but that is reachable). Records every connection it accepts; answers each with a
    recognisable response, so a gateway that does connect gets a clear answer, not a hang."""

    BODY = b"tripwire: the gateway connected to a refused address\n"

    def __init__(self, host: str, port: int = 0) -> None:
        try:
            self.sock = socket.create_server((host, port))
        except OSError as exc:
            raise RuntimeError(f"cannot put a tripwire listener on {host}:{port}: {exc}") from None
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.address = f"{host}:{self.port}"
        self.contacts: list[tuple[str, int]] = []
        self._stop = False
        self._queue_empty = threading.Event()  # set each time an accept finds nobody waiting
        self.sock.settimeout(0.05)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, addr = self.sock.accept()
            except TimeoutError:
                self._queue_empty.set()
                continue
            except OSError:
                continue
            self.contacts.append(addr[:2])
            with conn, contextlib.suppress(OSError):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                             % len(self.BODY) + self.BODY)

    def touched(self) -> list[tuple[str, int]]:
        """Every connection made before this call, including any still in the accept queue:
        waits until the accept loop has found the queue empty once after the call."""
        self._queue_empty.clear()
        if not self._queue_empty.wait(10):
            raise AssertionError("the tripwire's accept loop is stuck")
        return list(self.contacts)

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()
