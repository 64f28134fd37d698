"""A real ``redis-server`` (Debian package ``redis-server``) for tests: started on a free
loopback port with a temporary directory and no persistence, killed by its pid. With ``tls``
(certificate file, key file) it speaks TLS only (``rediss://``), with ``password`` it asks
for AUTH."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

from .. import required


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, tmp: Path, port: int | None = None, password: str | None = None,
                 tls: tuple[str, str] | None = None) -> None:
        self.tmp = tmp
        self.password = password
        self.tls = tls
        self.program = required.tool("redis-server")
        self.proc: subprocess.Popen | None = None
        for _ in range(5):  # a port taken between choosing it and binding it: choose again
            self.port = port or _free_port()
            if self._start():
                return
            if port is not None:
                break
        raise RuntimeError(f"redis-server did not start on 127.0.0.1:{self.port}")

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def _start(self) -> bool:
        ports = ["--port", str(self.port)]
        if self.tls:
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls[0],
                     "--tls-key-file", self.tls[1], "--tls-auth-clients", "no"]
        args = [self.program, *ports, "--bind", "127.0.0.1", "--dir", str(self.tmp),
                "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
                "--enable-debug-command", "local"]  # (DEBUG SLEEP: a store that stops answering)
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if self.ping():
                return True
            time.sleep(0.02)
        self.kill()
        return False

    def command(self, *words: str, timeout: float = 2) -> bytes:
        """One command in RESP, its raw answer (enough for PING and small replies)."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        try:
            if self.tls:  # (the test's own look: the server's certificate is not what is tested here)
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                s = ctx.wrap_socket(s)
            if self.password:
                s.sendall(_resp(["AUTH", self.password]))
                s.recv(64)
            s.sendall(_resp(list(words)))
            return s.recv(65536)
        finally:
            s.close()

    def ping(self) -> bool:
        try:
            return self.command("PING").startswith(b"+PONG")
        except (OSError, ssl.SSLError):
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def restart(self) -> None:
        """Again on the same port (the data is gone: no persistence)."""
        self.kill()
        deadline = time.monotonic() + 10
        while not self._start():
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start again")
            time.sleep(0.1)


def _resp(words: list[str]) -> bytes:
    out = [f"*{len(words)}\r\n".encode()]
    for w in words:
        b = w.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)
