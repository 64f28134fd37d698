"""Responses the proxy itself makes: errors with an RFC 9209 ``Proxy-Status`` header and a
one-line plain-text body, and the CONNECT success line. Sans-IO.

The reason phrase of an error names its reason (``403 Destination Not Allowed``): for a
failed CONNECT most clients (Python requests, curl) show the status line and nothing else.
The phrase comes from ``PHRASES`` (or, for a reason not listed there, the reason in title
case), never from client-controlled text, and is ASCII letters, digits, spaces and a few
punctuation marks, at most ``PHRASE_LIMIT`` characters.
"""

from __future__ import annotations

from http import HTTPStatus

from ..errors import AuthRequired, GatewayError

CONNECT_OK = b"HTTP/1.1 200 Connection established\r\n\r\n"
PROXY_NAME = "egressgate"
WHOAMI_URL = "http://egressgate.whoami/"
PHRASE_LIMIT = 64

# reason (errors.py, policy, proxy) -> the reason phrase of the status line
PHRASES = {
    # 400, 408, 431: the request
    "bad_request": "Bad Request",
    "bad_host": "Bad Destination Host",
    "bad_port": "Bad Destination Port",
    "bad_target": "Bad Request Target",
    "bad_scheme": "Unsupported URL Scheme",
    "bad_request_line": "Bad Request Line",
    "origin_form": "Absolute URI Required",
    "proxy_protocol": "Bad PROXY Protocol Header",
    "whoami_over_connect": f"Use {WHOAMI_URL}",
    "whoami_not_found": "No Such Whoami Page",
    "receipts_off": "Receipts Are Off",
    "client_timeout": "Request Timeout",
    "head_too_large": "Request Header Fields Too Large",
    # 501, 505: the request (501) or the origin's response (502) uses what the proxy does not forward
    "unsupported_transfer_coding": "Unsupported Transfer Coding",
    "http_version_not_supported": "HTTP Version Not Supported",
    # 407
    "auth_required": "Proxy Authentication Required",
    "bad_credentials": "Proxy Credentials Rejected",
    "unknown_user": "Proxy Credentials Rejected",  # (the same answer: no user enumeration)
    # 407 for a Kubernetes service-account token (policy.tokens): each names what was wrong
    "token_expired": "Token Expired",
    "token_not_yet_valid": "Token Not Yet Valid",
    "token_wrong_audience": "Token Audience Not Accepted",
    "token_unknown_issuer": "Token Issuer Not Accepted",
    "token_unknown_key": "Token Signing Key Unknown",
    "token_keys_unavailable": "Token Issuer Keys Unavailable",
    "token_bad_signature": "Token Signature Invalid",
    "token_bad_algorithm": "Token Algorithm Not Accepted",
    "token_malformed": "Malformed Token",
    "service_account_not_allowed": "Service Account Not Allowed",
    # 403
    "denied": "Request Denied",
    "client_not_allowed": "Client Not Allowed",
    "profile_not_allowed": "Egress Profile Not Allowed",
    "destination_not_allowed": "Destination Not Allowed",
    "destination_denied": "Destination Denied",
    "destination_ip_prohibited": "Destination IP Prohibited",
    "destination_name_prohibited": "Destination Name Prohibited",
    "connect_port_not_allowed": "Connect Port Not Allowed",
    "socks_port_not_allowed": "SOCKS Port Not Allowed",
    # 429
    "connection_limit_reached": "Client Limit Reached",
    "rate_limited": "Client Rate Limited",
    "auth_checks_busy": "Too Many Password Checks",
    "token_checks_busy": "Too Many Token Checks",
    # 500, 503
    "internal_error": "Internal Proxy Error",
    "unavailable": "Service Unavailable",
    "max_connections": "Gateway At Connection Limit",
    "egress_ip_unverified": "Egress IP Unverified",
    "egress_ip_mismatch": "Egress IP Mismatch",
    "egress_blocked": "Egress Blocked",
    # 502
    "upstream_error": "Bad Gateway",
    "dns_error": "DNS Lookup Failed",
    "connection_refused": "Destination Refused Connection",
    "connect_failed": "Destination Connect Failed",
    "unreachable": "Destination Unreachable",
    "family_mismatch": "Egress Address Family Mismatch",
    "source_unavailable": "Egress Source Address Unavailable",
    "upstream_protocol_error": "Bad Response From Upstream",
    "upstream_refused": "Upstream Proxy Refused Connect",
    "upstream_closed": "Upstream Closed Connection",
    # 504
    "connect_timeout": "Destination Connect Timeout",
    "dns_timeout": "DNS Lookup Timeout",
    "upstream_timeout": "Upstream Proxy Timeout",
    "response_timeout": "Origin Response Timeout",
    "idle_timeout": "Idle Timeout",
    # SOCKS5 negotiations (never an HTTP answer; the access record's reason)
    "socks_version": "Not SOCKS5",
    "socks_no_method": "No SOCKS Method Offered",
    "socks_no_acceptable_method": "No Acceptable SOCKS Method",
    "socks_auth_version": "Bad SOCKS Auth Version",
    "socks_command": "SOCKS Command Not Supported",
    "socks_address_type": "SOCKS Address Type Not Supported",
    "socks_oversized": "SOCKS Negotiation Too Large",
    "socks_reserved": "SOCKS Reserved Byte Not Zero",
    "socks_protocol_error": "SOCKS Protocol Error",
}


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def reason_phrase(err: GatewayError) -> str:
    """The status line's phrase for ``err``: from ``PHRASES``, else its reason in title case."""
    phrase = PHRASES.get(err.reason)
    if phrase is None:
        words = "".join(c if c.isascii() and c.isalnum() else " " for c in str(err.reason)).split()
        phrase = " ".join(w[:1].upper() + w[1:] for w in words)[:PHRASE_LIMIT].strip() or _phrase(err.status)
    return phrase


def _quoted(text: str) -> str:
    clean = text if text.isascii() and text.isprintable() else "".join(
        c if 0x20 <= ord(c) < 0x7F else "?" for c in text)
    return clean.replace("\\", "\\\\").replace('"', '\\"')


def error_response(err: GatewayError, keep_alive: bool = False) -> bytes:
    status = err.status
    phrase = reason_phrase(err)
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
    lines += [f"{k}: {v}" for k, v in err.headers]  # (set by the gateway, never client text)
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def simple_response(status: int, body: bytes, content_type: str = "application/json",
                    keep_alive: bool = False, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status} {_phrase(status)}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Cache-Control: no-store",
             "Connection: keep-alive" if keep_alive else "Connection: close"]
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
