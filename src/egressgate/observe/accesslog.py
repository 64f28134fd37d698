"""One access-log record per request or tunnel, as a JSON line (default) or in Squid's
native format, to stdout, a file, or nowhere.

Writing never blocks the event loop: records are formatted on the loop, batched, and
handed to a writer thread through a queue bounded in bytes (``log.max_queue``); what does not
fit is dropped and counted, so a destination that stops reading costs bounded memory.
``reopen()`` (SIGUSR1) reopens a file after logrotate moved it; when the path cannot be opened
(its directory is gone) the writer keeps the old descriptor and retries with back-off.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

from ..model import AccessRecord, iso8601, shown_target

_PIPE_BUF = 4096
FIELDS = ("ts", "ts_unix", "end_ts", "end_ts_unix", "client_addr", "client", "listener", "method", "target", "status", "profile", "egress_addr",
          "egress_ip", "upstream_addr", "bytes_up", "bytes_down", "duration_ms", "reason")
# Only on some records: ``user`` (the user name a 407 tried), ``would_deny`` (report mode), and
# what ``egressgate replay`` needs to decide a request again: ``auth`` (how an identified client
# identified: none, basic, token or cert), ``requested_profile`` (only when the client asked for
# one) and ``addresses`` (the addresses a host name resolved to, as the address guard judged them;
# absent for an IP literal, a chained proxy, or a refusal before the lookup).
AUTH = "auth"
REQUESTED_PROFILE = "requested_profile"
ADDRESSES = "addresses"
OPTIONAL_FIELDS = ("user", "would_deny", AUTH, REQUESTED_PROFILE, ADDRESSES)


def json_line(rec: AccessRecord, now: float) -> str:
    # ``ts``: when the request or tunnel started; the record is written when it ends (``end_ts``),
    # so a log file is in order of ending, not of ``ts``.
    doc = {
        "ts": iso8601(rec.start), "ts_unix": round(rec.start, 3), "end_ts": iso8601(now),
        "end_ts_unix": round(now, 3), "client_addr": rec.client_addr, "client": rec.client, "listener": rec.listener,
        "method": rec.method, "target": rec.target, "status": rec.status, "profile": rec.profile,
        "egress_addr": rec.egress_addr, "egress_ip": rec.egress_ip, "upstream_addr": rec.upstream_addr,
        "bytes_up": rec.bytes_up, "bytes_down": rec.bytes_down, "duration_ms": round((now - rec.start) * 1000, 3),
        "reason": rec.reason,
    }
    if rec.user is not None:
        doc["user"] = rec.user
    if rec.auth is not None:
        doc[AUTH] = rec.auth
        if rec.requested_profile is not None:
            doc[REQUESTED_PROFILE] = rec.requested_profile
        if rec.addresses is not None:
            doc[ADDRESSES] = rec.addresses
    if rec.extra:
        doc.update(rec.extra)
    return json.dumps(doc, separators=(",", ":")) + "\n"


def squid_line(rec: AccessRecord, now: float) -> str:
    """Squid's native format (``logformat squid``), then two fixed extra fields: the egress
    profile and the egress IP (``-`` when unknown)."""
    elapsed = int((now - rec.start) * 1000)
    if rec.status in (403, 407):
        code = "TCP_DENIED"
    else:
        code = "TCP_TUNNEL" if rec.method in ("CONNECT", "SOCKS5") else "TCP_MISS"
    hier = f"HIER_DIRECT/{rec.upstream_addr}" if rec.upstream_addr != "-" else "HIER_NONE/-"
    return (f"{rec.start:.3f} {elapsed:6d} {rec.client_addr} {code}/{rec.status:03d} {rec.bytes_down} "
            f"{rec.method} {_squid_field(rec.target)} {_squid_field(rec.client)} {hier} - "
            f"{_squid_field(rec.profile)} {rec.egress_ip or '-'}\n")


def _squid_field(text: str) -> str:
    """One space-separated field: never empty, no blanks or control characters."""
    if not text:
        return "-"
    if text.isprintable() and " " not in text:
        return text
    return "".join(c if c.isprintable() and c != " " else "%" + format(ord(c) & 0xFF, "02X") for c in text)


# The most bytes of formatted records waiting for the writer (``log.max_queue``); beyond it new
# records are dropped and counted (``egressgate_log_dropped_total{reason="queue_full"}``).
DEFAULT_MAX_QUEUE = 8 << 20
# A reopen (SIGUSR1) that fails is retried with back-off between these bounds; the old descriptor
# keeps receiving records meanwhile. A still-failing reopen is reported at most this often.
REOPEN_RETRY_FIRST = 0.25
REOPEN_RETRY_MAX = 5.0
REPORT_EVERY = 60.0
DROP_REASONS = ("queue_full", "write_error")


class AccessLog:
    """``write`` runs on the event loop and never blocks: it formats a record into the current
    batch, or drops and counts it when the batch and the writer's queue already hold
    ``max_queue`` bytes (a log destination that stopped reading -- a full pipe, a stuck disk --
    costs at most that much memory). One writer thread per log drains the queue.

    Counters are plain integers (no prometheus here): ``dropped()`` and ``queued_bytes()`` are
    read by the metrics collector at scrape time. ``dropped_full`` is only ever changed on the
    event loop's thread, ``dropped_error`` only on the writer's, so neither needs a lock.
    """

    def __init__(self, destination: str = "stdout", fmt: str = "json",
                 clock: Callable[[], float] = time.time, max_queue: int = DEFAULT_MAX_QUEUE,
                 monotonic: Callable[[], float] = time.monotonic, full_targets: bool = False) -> None:
        self.enabled = destination != "none"
        self.full_targets = full_targets  # False: targets without query strings or credentials
        self._destination = destination
        self._format = squid_line if fmt == "squid" else json_line
        self._clock = clock
        self._monotonic = monotonic
        self.max_queue = max_queue
        self._batch: list[bytes] = []
        self._batch_bytes = 0  # event-loop thread only
        self._cond = threading.Condition()
        self._chunks: deque[bytes] = deque()  # guarded by _cond
        self._queued = 0  # bytes in _chunks or being written; changed under _cond
        self._reopen_requested = False  # guarded by _cond
        self._closing = False  # guarded by _cond
        self.dropped_full = 0  # event-loop thread only
        self.dropped_error = 0  # writer thread only
        self._drop_reported = float("-inf")
        self._fd = -1
        self._thread: threading.Thread | None = None
        self._flush_scheduled = False
        if self.enabled:
            self._fd = self._open()  # raises OSError: a destination that cannot be opened at all
            self._thread = threading.Thread(target=self._run, name="egressgate-accesslog", daemon=True)
            self._thread.start()

    def _open(self) -> int:
        if self._destination == "stdout":
            return sys.stdout.fileno()
        return os.open(self._destination, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    # --- the event loop's side ------------------------------------------------------------
    def write(self, rec: AccessRecord) -> None:
        if not self.enabled:
            return
        if not self.full_targets:
            shown = shown_target(rec.target)
            if shown != rec.target:
                rec = dataclasses.replace(rec, target=shown)
        line = self._format(rec, self._clock()).encode("utf-8", "replace")
        # (_queued is read without the lock: a stale value is only ever too high, never too low)
        if self._queued + self._batch_bytes + len(line) > self.max_queue:
            self._drop()
            return
        self._batch.append(line)
        self._batch_bytes += len(line)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            import asyncio

            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                self.flush()

    def _drop(self) -> None:
        self.dropped_full += 1
        now = self._monotonic()
        if now - self._drop_reported >= REPORT_EVERY:
            self._drop_reported = now
            log_event("access_log_dropping", reason="queue_full", destination=self._destination,
                      max_queue=self.max_queue, dropped=self.dropped_full)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._batch:
            data = b"".join(self._batch)
            self._batch = []
            self._batch_bytes = 0
            with self._cond:
                self._chunks.append(data)
                self._queued += len(data)
                self._cond.notify()

    def dropped(self) -> dict[str, int]:
        return {"queue_full": self.dropped_full, "write_error": self.dropped_error}

    def queued_bytes(self) -> int:
        return self._queued + self._batch_bytes

    def reopen(self) -> None:
        """Reopen the file (after logrotate moved it). On failure the old descriptor stays in
        use and the open is retried with back-off until it works."""
        with self._cond:
            self._reopen_requested = True
            self._cond.notify()

    def close(self, wait: float = 5.0) -> None:
        """Write what is queued and stop the writer; wait at most ``wait`` seconds for it (a
        destination that blocks forever must not hold up a shutdown or a reload)."""
        if self._thread is None:
            return
        self.flush()
        with self._cond:
            self._closing = True
            self._cond.notify()
        if wait:
            self._thread.join(timeout=wait)
        self._thread = None

    # --- the writer thread ----------------------------------------------------------------
    def _run(self) -> None:
        """The writer thread; it outlives any bug in its own loop (reported, then resumed)."""
        for _ in range(1000):  # (a loop that keeps failing stops; the proxy never depends on it)
            try:
                self._drain()
                return
            except Exception as exc:  # pragma: no cover - a bug; never lose the writer to it
                log_event("access_log_error", error=repr(exc), destination=self._destination)

    def _drain(self) -> None:
        retry_at: float | None = None  # when to try a failed reopen again
        delay = REOPEN_RETRY_FIRST
        failures = 0
        reported = float("-inf")
        while True:
            with self._cond:
                while not (self._chunks or self._closing or self._reopen_requested):
                    if retry_at is None:
                        self._cond.wait()
                        continue
                    left = retry_at - self._monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                chunk = self._chunks.popleft() if self._chunks else None
                done = self._closing and chunk is None
                reopen = self._reopen_requested or (retry_at is not None and self._monotonic() >= retry_at)
                self._reopen_requested = False
            if reopen and self._destination != "stdout":
                try:
                    fd = self._open()
                except OSError as exc:
                    failures += 1
                    now = self._monotonic()
                    retry_at = now + delay
                    if now - reported >= REPORT_EVERY:
                        reported = now
                        log_event("access_log_reopen_failed", path=self._destination,
                                  error=exc.strerror or str(exc), attempts=failures, retry_in=delay,
                                  note="records go to the previous file until the path can be opened")
                    delay = min(delay * 2, REOPEN_RETRY_MAX)
                else:
                    old, self._fd = self._fd, fd
                    _close_quietly(old)
                    if failures:
                        log_event("access_log_reopened", path=self._destination, attempts=failures + 1)
                    retry_at, delay, failures, reported = None, REOPEN_RETRY_FIRST, 0, float("-inf")
            if chunk is not None:
                try:
                    self._write(chunk)
                finally:
                    with self._cond:
                        self._queued -= len(chunk)
            if done:
                if self._destination != "stdout":
                    _close_quietly(self._fd)
                return

    def _write(self, data: bytes) -> None:
        """Write whole lines, at most PIPE_BUF bytes a call, so that several worker processes
        sharing one pipe or file never interleave parts of lines. Lines that cannot be written
        (the destination is gone or full) are dropped and counted."""
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
            except OSError:  # never take the gateway down for its log
                self.dropped_error += max(1, bytes(view).count(b"\n"))
                return
            view = view[written:]


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def log_event(event: str, **fields: object) -> None:
    """A structured operational event (not an access record) on stderr."""
    doc = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, **fields}
    try:
        os.write(2, (json.dumps(doc, default=str) + "\n").encode())
    except OSError:
        pass
