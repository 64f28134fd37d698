"""The messages between a worker and its instance's owner (worker 0), and between owners
through a fleet store: one JSON object per line, bounded (pure: bytes in, values out).

A budget key travels as a list of its three configured names. What a peer sends is checked
here (``key``, ``count``, ``number``) before anything uses it: a malformed message is
dropped, never trusted."""

from __future__ import annotations

import json
import math

MAX_LINE = 65536  # a longer line ends the connection (StreamReader limit)
MAX_BUFFERED = 1 << 20  # bytes waiting for a peer that does not read: past this it is cut off


def encode(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict | None:
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return msg if isinstance(msg, dict) else None


def key(value: object) -> tuple[str, str, str] | None:
    if isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) and len(v) <= 512 for v in value):
        return (value[0], value[1], value[2])
    return None


def count(value: object, most: int = 1 << 30) -> int | None:
    """A non-negative integer no larger than ``most``."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= most:
        return value
    return None


def number(value: object) -> float | None:
    """A finite, non-negative number."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    return None
