"""Reading JSON access logs back (``egressgate replay``): plain or gzipped files (told apart by
their first bytes, not their names), rotated files and several instances' logs together, as one
stream in order of when each record ended (the order a log is written in), in constant memory.

Each file is read line by line; several files are merged by ``heapq.merge`` (one pending record
per file). A line that is not a JSON object with the fields a replay needs is not fatal: it is
handed to ``on_malformed`` with its file and line number, and reading goes on.

A ``Line`` carries the record as parsed plus where it came from (``where``: ``FILE:LINE``).
"""

from __future__ import annotations

import gzip
import heapq
import io
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ..model import parse_iso8601

GZIP_MAGIC = b"\x1f\x8b"
STDIN = "-"
REQUIRED = ("client", "client_addr", "method", "target", "status")  # besides a start time (ts_unix or ts)


@dataclass(frozen=True, slots=True)
class Malformed:
    path: str
    line: int
    error: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.error}"


class Line:
    """One record: ``doc`` (the JSON object), ``start``/``end`` in Unix seconds, where it came from."""

    __slots__ = ("end", "start", "doc", "path", "line")

    def __init__(self, end: float, start: float, doc: dict, path: str, line: int) -> None:
        self.end = end
        self.start = start
        self.doc = doc
        self.path = path
        self.line = line

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def parse_time(text: str) -> float:
    """``2026-12-01T00:02:07.296Z`` (the log's ``ts``; seconds fraction optional) -> Unix seconds."""
    return parse_iso8601(text)


def open_binary(path: str) -> io.BufferedIOBase:
    """The file's bytes, gunzipped when it starts with the gzip magic (``-``: standard input)."""
    raw = sys.stdin.buffer if path == STDIN else open(path, "rb")  # noqa: SIM115 (closed by the caller)
    if isinstance(raw, io.BufferedReader) and raw.peek(2)[:2] == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def _times(doc: dict) -> tuple[float, float]:
    """(start, end) of a record: ``ts_unix`` / ``end_ts_unix`` when present, else from ``ts`` and
    ``duration_ms`` (logs written before those fields existed)."""
    start = doc.get("ts_unix")
    if not isinstance(start, int | float) or isinstance(start, bool):
        ts = doc.get("ts")
        if not isinstance(ts, str):
            raise ValueError("no start time (ts)")
        start = parse_time(ts)
    end = doc.get("end_ts_unix")
    if not isinstance(end, int | float) or isinstance(end, bool):
        duration = doc.get("duration_ms")
        end = start + (duration / 1000.0 if isinstance(duration, int | float) and duration > 0 else 0.0)
    return float(start), float(end)


def read(path: str, on_malformed: Callable[[Malformed], None]) -> Iterator[Line]:
    """The records of one file, in file order."""
    loads = json.loads
    stream = open_binary(path)
    try:
        for number, raw in enumerate(stream, 1):
            if not raw.strip():
                continue
            try:
                doc = loads(raw)
                if not isinstance(doc, dict):
                    raise ValueError("not a JSON object")
                for name in REQUIRED:
                    if name not in doc:
                        raise ValueError(f"no {name} field")
                if not isinstance(doc["status"], int):
                    raise ValueError("status is not a number")
                start, end = _times(doc)
            except ValueError as exc:  # (json.JSONDecodeError and UnicodeDecodeError are ValueErrors)
                what = f"not JSON: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else str(exc)
                on_malformed(Malformed(path, number, what))
                continue
            yield Line(end, start, doc, path, number)
    except (OSError, EOFError) as exc:  # a truncated gzip member, a read error: the rest of this file is lost
        on_malformed(Malformed(path, 0, f"cannot read further: {exc}"))
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def merged(paths: Iterable[str], on_malformed: Callable[[Malformed], None]) -> Iterator[Line]:
    """Every record of every file, in order of end time (each file is already in that order, as the
    gateway writes it; rotated files and other instances' logs interleave by time)."""
    streams = [read(p, on_malformed) for p in paths]
    if len(streams) == 1:
        return streams[0]
    return heapq.merge(*streams, key=_end)


def _end(line: Line) -> float:
    return line.end
