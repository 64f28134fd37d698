"""A loopback origin that counts what a provider would see: requests in flight at once (and
the most ever), arrivals with their times, and -- for ``/answer?code=N&retry_after=V`` -- an
answer the test chooses. ``/hold`` requests stay open until ``release`` is set (or
``hold_limit`` seconds pass), so a test can see how many the gateway let through at once."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class CountingOrigin:
    def __init__(self, host: str = "127.0.0.1", hold_limit: float = 30.0) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most = 0
        self.arrivals: list[tuple[float, str]] = []  # (monotonic time, path)
        self.release = threading.Event()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            wbufsize = 65536  # one write per answer

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                with origin.lock:
                    origin.in_flight += 1
                    origin.most = max(origin.most, origin.in_flight)
                    origin.arrivals.append((time.monotonic(), url.path))
                try:
                    status, extra = 200, {}
                    if url.path == "/hold":
                        origin.release.wait(hold_limit)
                    elif url.path == "/answer":
                        status = int(q.get("code", "200"))
                        if "retry_after" in q:
                            extra["Retry-After"] = q["retry_after"]
                    body = f"{status} {url.path}\n".encode()
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in extra.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                finally:
                    with origin.lock:
                        origin.in_flight -= 1

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.host = host
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    def seen(self, path: str | None = None) -> int:
        with self.lock:
            return sum(1 for _, p in self.arrivals if path is None or p == path)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
