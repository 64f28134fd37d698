"""One access-log record per request or tunnel, as a JSON line (default) or in Squid's
native format, to stdout, a file, or nowhere.

Writing never blocks the event loop: records are formatted on the loop, batched, and
handed to a writer thread. ``reopen()`` (SIGUSR1) reopens a file after logrotate moved it.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable

from ..model import AccessRecord

_PIPE_BUF = 4096
FIELDS = ("ts", "client_addr", "client", "listener", "method", "target", "status", "profile", "egress_addr",
          "upstream_addr", "bytes_up", "bytes_down", "duration_ms", "reason")


def json_line(rec: AccessRecord, now: float) -> str:
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(rec.start)) + f".{int(rec.start * 1000) % 1000:03d}Z"
    doc = {
        "ts": ts, "client_addr": rec.client_addr, "client": rec.client, "listener": rec.listener,
        "method": rec.method, "target": rec.target, "status": rec.status, "profile": rec.profile,
        "egress_addr": rec.egress_addr, "upstream_addr": rec.upstream_addr, "bytes_up": rec.bytes_up,
        "bytes_down": rec.bytes_down, "duration_ms": round((now - rec.start) * 1000, 3), "reason": rec.reason,
    }
    if rec.extra:
        doc.update(rec.extra)
    return json.dumps(doc, separators=(",", ":")) + "\n"


def squid_line(rec: AccessRecord, now: float) -> str:
    elapsed = int((now - rec.start) * 1000)
    code = "TCP_TUNNEL" if rec.method == "CONNECT" else ("TCP_DENIED" if rec.status in (403, 407) else "TCP_MISS")
    hier = f"HIER_DIRECT/{rec.upstream_addr}" if rec.upstream_addr != "-" else "HIER_NONE/-"
    return (f"{rec.start:.3f} {elapsed:6d} {rec.client_addr} {code}/{rec.status:03d} {rec.bytes_down} "
            f"{rec.method} {rec.target} {rec.client if rec.client != '-' else '-'} {hier} -\n")


class AccessLog:
    def __init__(self, destination: str = "stdout", fmt: str = "json",
                 clock: Callable[[], float] = time.time) -> None:
        self.enabled = destination != "none"
        self._destination = destination
        self._format = squid_line if fmt == "squid" else json_line
        self._clock = clock
        self._batch: list[str] = []
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._fd = -1
        self._reopen = threading.Event()
        self._thread: threading.Thread | None = None
        self._flush_scheduled = False
        self._loop = None
        if self.enabled:
            self._open()
            self._thread = threading.Thread(target=self._run, name="egressgate-accesslog", daemon=True)
            self._thread.start()

    def _open(self) -> None:
        if self._destination == "stdout":
            self._fd = sys.stdout.fileno()
        else:
            self._fd = os.open(self._destination, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def write(self, rec: AccessRecord) -> None:
        if not self.enabled:
            return
        self._batch.append(self._format(rec, self._clock()))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            import asyncio

            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._batch:
            self._queue.put("".join(self._batch))
            self._batch = []

    def reopen(self) -> None:
        self._reopen.set()
        self._queue.put("")

    def close(self) -> None:
        if self._thread is None:
            return
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout=5)
        self._thread = None

    def _run(self) -> None:
        while True:
            chunk = self._queue.get()
            if chunk is None:
                return
            if self._reopen.is_set():
                self._reopen.clear()
                if self._destination != "stdout":
                    os.close(self._fd)
                    self._open()
            if chunk:
                self._write(chunk.encode("utf-8", "replace"))

    def _write(self, data: bytes) -> None:
        """Write whole lines, at most PIPE_BUF bytes a call, so that several worker processes
        sharing one pipe or file never interleave parts of lines."""
        view = memoryview(data)
        while view:
            piece = view[:_PIPE_BUF]
            if len(view) > _PIPE_BUF:
                cut = bytes(piece).rfind(b"\n") + 1
                piece = view[:cut] if cut else piece
            try:
                written = os.write(self._fd, piece)
            except InterruptedError:
                continue
            except OSError:
                return  # the log destination is gone; never take the gateway down for it
            view = view[written:]



def log_event(event: str, **fields: object) -> None:
    """A structured operational event (not an access record) on stderr."""
    doc = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, **fields}
    try:
        os.write(2, (json.dumps(doc, default=str) + "\n").encode())
    except OSError:
        pass
