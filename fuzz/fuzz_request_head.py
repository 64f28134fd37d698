#!/usr/bin/env python3
"""Coverage-guided fuzzing of the request-head path (and the response parser) with atheris.

The same properties as ``tests/unit/test_fuzz_parse.py`` (hypothesis, run in CI), for longer
runs: no exception but a ``GatewayError`` escapes; the outcome (events, error type, tunnel
bytes) is the same whether the input is fed whole, in the fuzzer's chosen pieces, or one byte
at a time; events follow the message grammar; no input hangs (libFuzzer's ``-timeout``).

Run (atheris is not a project dependency; it installs as a wheel on CPython 3.11 / x86-64)::

    .venv/bin/pip install atheris
    mkdir -p fuzz/corpus && .venv/bin/python fuzz/fuzz_request_head.py --seed-corpus fuzz/corpus
    .venv/bin/python fuzz/fuzz_request_head.py fuzz/corpus -max_total_time=600 -timeout=5 -rss_limit_mb=2048

Any libFuzzer flag works (``-jobs=2 -workers=2``, ``-runs=N``, ``-dict=FILE``). A crash leaves
``crash-<sha1>`` in the working directory; replay it with
``.venv/bin/python fuzz/fuzz_request_head.py crash-<sha1>``.

A known, not yet fixed finding is skipped so a long run can find others: set
``EGRESSGATE_FUZZ_STRICT=1`` to check it too (see ``KNOWN``).

Input layout: byte 0 picks the mode (bit 0: request or response; bits 1-2: the request method
a response answers; bit 6: EOF after a response; bit 7: small limits for requests), byte 1 the
number of cut points (mod 17), then one byte per cut point, then the payload.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import atheris  # noqa: E402

with atheris.instrument_imports(include=["egressgate"]):
    from egressgate.http1.parse import RequestParser, ResponseParser  # noqa: F401

from tests.unit.test_fuzz_parse import (  # noqa: E402
    check_request_grammar,
    check_response_grammar,
    run_requests,
    run_response,
    split,
)

STRICT = os.environ.get("EGRESSGATE_FUZZ_STRICT") == "1"
# Found, not yet fixed (tests/unit/test_fuzz_parse.py has it as a strict xfail): after a
# response to HEAD, bytes in the same feed are dropped silently, in a later feed refused.
KNOWN = {"head_trailing_bytes"}
METHODS = ("GET", "HEAD", "POST", "CONNECT")


def TestOneInput(data: bytes) -> None:
    if len(data) < 2:
        return
    mode = data[0]
    n_cuts = data[1] % 17
    cuts = [data[2 + i] for i in range(min(n_cuts, len(data) - 2))]  # cut points (mod payload length)
    payload = data[2 + len(cuts):]
    small = bool(mode & 0x80)
    if mode & 1 == 0:
        limits = {"max_head_bytes": 128, "max_headers": 4} if small else {}
        whole = run_requests([payload], **limits)
        for chunks in (split(payload, cuts), [payload[i:i + 1] for i in range(len(payload))]):
            got = run_requests(chunks, **limits)
            if got != whole:
                raise AssertionError(f"request outcome depends on the split:\n{whole}\n{got}")
        check_request_grammar(whole[0], whole[2])
    else:
        method = METHODS[(mode >> 1) % len(METHODS)]
        eof = bool(mode & 0x40)
        whole = run_response([payload], method, eof)
        pieces = run_response(split(payload, cuts), method, eof)
        if (not STRICT and "head_trailing_bytes" in KNOWN and method == "HEAD" and whole[0] == pieces[0]
                and any(e[0] == "end" for e in whole[0])):
            return
        if pieces != whole:
            raise AssertionError(f"response outcome depends on the split:\n{whole}\n{pieces}")
        check_response_grammar(whole[0])


SEEDS = [
    b"\x00\x00GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n",
    b"\x00\x02\x05\x30POST http://a.example:8080/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
    b"\x00\x01\x20PUT http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"\x00\x00CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n\x16\x03\x01",
    b"\x80\x00GET http://a/ HTTP/1.0\r\nConnection: keep-alive\r\nA: b\r\nC: d\r\n\r\n",
    b"\x00\x00GET http://a/ HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\nGET http://b/ HTTP/1.1\r\n\r\n",
    b"\x01\x00HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
    b"\x41\x00HTTP/1.1 200 OK\r\n\r\nclose-delimited",
    b"\x01\x01\x10HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    b"\x03\x00HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
]


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--seed-corpus":
        out = Path(sys.argv[2])
        out.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(SEEDS):
            (out / f"seed-{i:02d}").write_bytes(seed)
        print(f"{len(SEEDS)} seeds written to {out}")
        return
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
