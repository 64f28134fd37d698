"""Responses the proxy itself makes: errors with an RFC 9209 ``Proxy-Status`` header and a
one-line plain-text body, and the CONNECT success line. Sans-IO."""

from __future__ import annotations

from http import HTTPStatus

from ..errors import AuthRequired, GatewayError

CONNECT_OK = b"HTTP/1.1 200 Connection established\r\n\r\n"
PROXY_NAME = "egressgate"


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _quoted(text: str) -> str:
    clean = "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text)
    return clean.replace("\\", "\\\\").replace('"', '\\"')


def error_response(err: GatewayError, keep_alive: bool = False) -> bytes:
    status = err.status
    phrase = _phrase(status)
    body = f"{status} {phrase}: {_quoted(err.detail)}\n".encode()
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        f'Proxy-Status: {PROXY_NAME}; error={err.proxy_status}; details="{_quoted(err.detail)}"',
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: keep-alive" if keep_alive else "Connection: close",
    ]
    if isinstance(err, AuthRequired):
        lines.append(f'Proxy-Authenticate: Basic realm="{PROXY_NAME}"')
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def simple_response(status: int, body: bytes, content_type: str = "application/json",
                    keep_alive: bool = False, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status} {_phrase(status)}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Cache-Control: no-store",
             "Connection: keep-alive" if keep_alive else "Connection: close"]
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
