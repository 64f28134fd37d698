"""A loopback origin that counts what a provider would see: requests in flight at once (and
the most ever), arrivals with their times, and -- for ``/answer?code=N&retry_after=V`` -- an
answer the test chooses. ``/hold`` requests stay open until ``release`` is set (or
``hold_limit`` seconds pass), so a test can see how many the gateway let through at once."""

from __future__ import annotations

import threading
import time

from .peers import HTTPPeer, QuietHandler, asked_answer


class CountingOrigin(HTTPPeer):
    def __init__(self, host: str = "127.0.0.1", hold_limit: float = 30.0) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most = 0
        self.arrivals: list[tuple[float, str]] = []  # (monotonic time, path)
        self.release = threading.Event()
        origin = self

        class Handler(QuietHandler):
            wbufsize = 65536  # one write per answer

            def do_GET(self) -> None:
                path, q = self.query()
                with origin.lock:
                    origin.in_flight += 1
                    origin.most = max(origin.most, origin.in_flight)
                    origin.arrivals.append((time.monotonic(), path))
                try:
                    status, extra = asked_answer(q) if path == "/answer" else (200, {})
                    if path == "/hold":
                        origin.release.wait(hold_limit)
                    self.reply(status, f"{status} {path}\n".encode(), extra)
                finally:
                    with origin.lock:
                        origin.in_flight -= 1

        super().__init__(Handler, host)
        self.host = host

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    def seen(self, path: str | None = None) -> int:
        with self.lock:
            return sum(1 for _, p in self.arrivals if path is None or p == path)

    def close(self) -> None:
        self.release.set()
        super().close()
