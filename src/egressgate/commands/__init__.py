"""The command-line verbs (``cli`` parses the arguments and calls each ``main``): ``verify`` (the
member x provider matrix), ``explain`` (what the gateway would decide for one request), ``demo``
(the product on loopback), ``replay`` (recorded traffic under a candidate config; its decisions
in ``replay_core``) and ``receipt`` (check a job receipt's signature, show the receipt key).
The top layer: commands may import anything, nothing imports them."""

from __future__ import annotations

from typing import TextIO

from ..errors import ConfigError
from ..proxy.build import load_candidate
from ..proxy.runtime import Runtime


def candidate_or_say_why(path: str, err: TextIO) -> Runtime | None:
    """``path`` compiled for deciding (``proxy.build.load_candidate``), or None after every
    ``FILE:LINE: key: what`` of its errors went to ``err`` (the command then exits 2)."""
    try:
        return load_candidate(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=err)
        return None
