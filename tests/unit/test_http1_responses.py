"""http1/responses.py: error responses with RFC 9209 Proxy-Status, 407 challenge, one-line body."""

from __future__ import annotations

import re

import pytest

from egressgate import errors
from egressgate.http1.parse import ResponseParser
from egressgate.http1.responses import CONNECT_OK, PHRASE_LIMIT, PHRASES, error_response, simple_response


class _Sink:
    def __init__(self) -> None:
        self.head = None
        self.body = b""
        self.ended = False

    def on_response_head(self, head) -> None:
        self.head = head

    def on_response_body(self, data: bytes) -> None:
        self.body += data

    def on_response_end(self) -> None:
        self.ended = True


def parse(raw: bytes) -> _Sink:
    sink = _Sink()
    ResponseParser(sink, "GET").feed(raw)
    assert sink.ended, "the response must be complete and self-delimited"
    return sink


def header(sink: _Sink, name: bytes) -> list[bytes]:
    return [v for n, v in sink.head.headers if n.lower() == name]


# sf-token / sf-string per RFC 8941, as RFC 9209 uses them
PROXY_STATUS = re.compile(rb'^egressgate; error=[a-z][a-z0-9_]*; details="(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*"$')

ERRORS = [
    # (error, status, Proxy-Status error type)
    (errors.ClientProtocolError("bad"), 400, "http_request_error"),
    (errors.HeadTooLarge("big"), 431, "http_request_error"),
    (errors.ClientTimeout("slow"), 408, "http_request_error"),
    (errors.AuthRequired("who?"), 407, "http_request_denied"),
    (errors.PolicyDenied("no"), 403, "http_request_denied"),
    (errors.AddressProhibited("10.0.0.1 is private"), 403, "destination_ip_prohibited"),
    (errors.LimitReached("full"), 429, "connection_limit_reached"),
    (errors.Unavailable("draining"), 503, "proxy_internal_response"),
    (errors.UpstreamError("reset"), 502, "proxy_internal_error"),
    (errors.DnsError("nxdomain"), 502, "dns_error"),
    (errors.ConnectRefused("refused"), 502, "connection_refused"),
    (errors.UpstreamProtocolError("junk"), 502, "http_protocol_error"),
    (errors.UpstreamTimeout("slow"), 504, "connection_timeout"),
    (errors.GatewayError("oops"), 500, "proxy_internal_error"),
    (errors.PolicyDenied("x", status=451, proxy_status="destination_not_found"), 451, "destination_not_found"),
]


@pytest.mark.parametrize(("err", "status", "proxy_status"), ERRORS, ids=[type(e[0]).__name__ for e in ERRORS])
def test_error_response(err: errors.GatewayError, status: int, proxy_status: str) -> None:
    raw = error_response(err)
    sink = parse(raw)
    assert sink.head.status == status
    values = header(sink, b"proxy-status")
    assert len(values) == 1
    assert PROXY_STATUS.match(values[0]), values[0]
    assert values[0].startswith(f"egressgate; error={proxy_status}; ".encode())
    assert header(sink, b"content-type") == [b"text/plain; charset=utf-8"]
    assert header(sink, b"connection") == [b"close"]
    assert sink.body.endswith(b"\n") and sink.body.count(b"\n") == 1
    assert sink.body.startswith(f"{status} ".encode())
    assert err.detail.encode() in sink.body
    challenge = header(sink, b"proxy-authenticate")
    if status == 407:
        assert challenge == [b'Basic realm="egressgate"']
    else:
        assert challenge == []


@pytest.mark.parametrize("detail", [
    'quote " and backslash \\ here',
    "two\nlines\r\nand a tab\t",
    "non-ascii: bücher ☃",
    "header injection\r\nSet-Cookie: x=1",
])
def test_details_are_escaped_and_the_body_stays_one_line(detail: str) -> None:
    raw = error_response(errors.PolicyDenied(detail))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert body.count(b"\n") == 1 and body.endswith(b"\n")
    assert b"\r" not in body
    assert not any(line.lower().startswith(b"set-cookie") for line in head.split(b"\r\n"))
    sink = parse(raw)
    (value,) = header(sink, b"proxy-status")
    assert PROXY_STATUS.match(value), value
    assert len(sink.body) == int(header(sink, b"content-length")[0])


def test_quoted_details_round_trip() -> None:
    sink = parse(error_response(errors.PolicyDenied('say "hi" \\o/')))
    (value,) = header(sink, b"proxy-status")
    assert value.endswith(b'details="say \\"hi\\" \\\\o/"')


def test_keep_alive_error_response() -> None:
    sink = parse(error_response(errors.AuthRequired("creds"), keep_alive=True))
    assert header(sink, b"connection") == [b"keep-alive"]
    assert sink.head.keep_alive


def test_status_line_phrases() -> None:
    assert error_response(errors.AuthRequired("x")).startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
    assert error_response(errors.PolicyDenied("x", reason="destination_not_allowed")).startswith(
        b"HTTP/1.1 403 Destination Not Allowed\r\n")
    assert error_response(errors.PolicyDenied("x", reason="connect_port_not_allowed")).startswith(
        b"HTTP/1.1 403 Connect Port Not Allowed\r\n")
    assert error_response(errors.AddressProhibited("x")).startswith(b"HTTP/1.1 403 Destination IP Prohibited\r\n")
    assert error_response(errors.LimitReached("x")).startswith(b"HTTP/1.1 429 Client Limit Reached\r\n")
    assert error_response(errors.DnsError("x")).startswith(b"HTTP/1.1 502 DNS Lookup Failed\r\n")
    assert error_response(errors.UpstreamTimeout("x")).startswith(b"HTTP/1.1 504 Destination Connect Timeout\r\n")
    assert error_response(errors.GatewayError("x", status=599)).startswith(b"HTTP/1.1 599 Internal Proxy Error\r\n")


def test_the_body_repeats_the_status_line() -> None:
    sink = parse(error_response(errors.PolicyDenied("api.example:443 for client c (allow)",
                                                    reason="destination_not_allowed")))
    assert sink.body == b"403 Destination Not Allowed: api.example:443 for client c (allow)\n"


SAFE_PHRASE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 .:/-]*$")


@pytest.mark.parametrize("reason", sorted(PHRASES))
def test_table_phrases_are_ascii_bounded_and_safe(reason: str) -> None:
    phrase = PHRASES[reason]
    assert SAFE_PHRASE.match(phrase) and len(phrase) <= PHRASE_LIMIT, phrase


@pytest.mark.parametrize(("reason", "phrase"), [
    ("some_new_reason", "Some New Reason"),
    ("x" * 200, "X" + "x" * (PHRASE_LIMIT - 1)),
    ("evil\r\nSet-Cookie: a=1", "Evil Set Cookie A 1"),
    ("b\u00fccher", "B Cher"),
    ("", "Forbidden"),
    ("___", "Forbidden"),
])
def test_unlisted_reasons_fall_back_to_title_case(reason: str, phrase: str) -> None:
    raw = error_response(errors.PolicyDenied("x", reason=reason))
    assert raw.startswith(f"HTTP/1.1 403 {phrase}\r\n".encode())
    assert parse(raw).head.status == 403


def _raised_reasons() -> set[str]:
    """Every reason the source code gives an error: class attributes of error classes, reason=
    keywords of calls that build one, and the reasons policy.decide and the pools return."""
    import ast
    import pathlib

    import egressgate

    root = pathlib.Path(egressgate.__file__).parent
    found: set[str] = set()
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    if (isinstance(stmt, ast.Assign) and [getattr(t, "id", None) for t in stmt.targets] == ["reason"]
                            and isinstance(stmt.value, ast.Constant)):
                        found.add(stmt.value.value)
            elif isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                if name in ("log_event", "labels"):
                    continue
                for kw in node.keywords:
                    if kw.arg == "reason" and isinstance(kw.value, ast.Constant):
                        found.add(kw.value.value)
                if name == "Decision" and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                    found.add(node.args[1].value)
            elif (isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple) and node.value.elts
                  and isinstance(node.value.elts[0], ast.Constant) and path.name == "plan.py"):
                found.add(node.value.elts[0].value)  # ProfilePool.refusal(): (reason, detail)
    return {r for r in found if isinstance(r, str)} - {"allowed"}


def test_every_reason_in_the_code_has_a_phrase() -> None:
    missing = _raised_reasons() - set(PHRASES)
    assert not missing, f"add these reasons to http1.responses.PHRASES: {sorted(missing)}"


def test_simple_response() -> None:
    raw = simple_response(200, b'{"ok":true}', extra=(("X-A", "1"),))
    sink = parse(raw)
    assert sink.head.status == 200
    assert sink.body == b'{"ok":true}'
    assert header(sink, b"content-type") == [b"application/json"]
    assert header(sink, b"cache-control") == [b"no-store"]
    assert header(sink, b"x-a") == [b"1"]


def test_connect_ok() -> None:
    assert CONNECT_OK == b"HTTP/1.1 200 Connection established\r\n\r\n"
