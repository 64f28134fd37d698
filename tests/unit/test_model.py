"""model.py: HostPort.parse_authority, normalize_host, DestPattern.parse, UpstreamProxy.parse."""

from __future__ import annotations

import base64
import dataclasses

import pytest

from egressgate.errors import ClientProtocolError
from egressgate.model import DestPattern, HostPort, UpstreamProxy, normalize_host

# ------------------------------------------------------------------------------ parse_authority

AUTHORITY_OK = [
    # (authority, default_port, host, port)
    ("example.com:443", None, "example.com", 443),
    ("EXAMPLE.Com:443", None, "example.com", 443),
    ("example.com.:8443", None, "example.com", 8443),
    ("  example.com:80  ", None, "example.com", 80),
    ("example.com", 80, "example.com", 80),
    ("a-b_c.example:1", None, "a-b_c.example", 1),
    ("x:65535", None, "x", 65535),
    ("203.0.113.7:443", None, "203.0.113.7", 443),
    ("[2001:db8::1]:443", None, "2001:db8::1", 443),
    ("[2001:DB8:0:0::1]:443", None, "2001:db8::1", 443),
    ("[::1]", 8080, "::1", 8080),
    ("bücher.example:443", None, "xn--bcher-kva.example", 443),
]


@pytest.mark.parametrize(("authority", "default", "host", "port"), AUTHORITY_OK, ids=[c[0] for c in AUTHORITY_OK])
def test_parse_authority_accepts(authority: str, default: int | None, host: str, port: int) -> None:
    hp = HostPort.parse_authority(authority, default_port=default)
    assert (hp.host, hp.port) == (host, port)


AUTHORITY_BAD = [
    # (authority, default_port, reason)
    ("example.com", None, "bad_port"),
    ("example.com:", None, "bad_port"),
    ("example.com:0", None, "bad_port"),
    ("example.com:65536", None, "bad_port"),
    ("example.com:123456", None, "bad_port"),
    ("example.com:-1", None, "bad_port"),
    ("example.com:+80", None, "bad_port"),
    ("example.com:8o", None, "bad_port"),
    (":443", None, "bad_host"),
    ("[2001:db8::1", None, "bad_host"),
    ("[2001:db8::1]", None, "bad_port"),
    ("[2001:db8::1]x443", None, "bad_port"),
    ("[example.com]:443", None, "bad_host"),
    ("[203.0.113.7]:443", None, "bad_host"),  # brackets are for IPv6 only
    ("2001:db8::1:443", None, "bad_host"),  # unbracketed IPv6
    ("[fe80::1%eth0]:443", None, "bad_host"),  # zone identifiers refused
    ("exa mple.com:443", None, "bad_host"),
    ("exa/mple.com:443", None, "bad_host"),
    ("-lead.example:443", None, "bad_host"),
    ("trail-.example:443", None, "bad_host"),
    ("a..b:443", None, "bad_host"),
    ("x" * 64 + ".example:443", None, "bad_host"),  # label over 63
    (".".join(["a" * 60] * 5) + ":443", None, "bad_host"),  # host over 253
    ("2130706433:80", None, "bad_host"),
    ("127.1:80", None, "bad_host"),
]


@pytest.mark.parametrize(("authority", "default", "reason"), AUTHORITY_BAD, ids=[c[0][:40] for c in AUTHORITY_BAD])
def test_parse_authority_refuses(authority: str, default: int | None, reason: str) -> None:
    with pytest.raises(ClientProtocolError) as info:
        HostPort.parse_authority(authority, default_port=default)
    assert info.value.reason == reason
    assert info.value.status == 400


def test_hostport_str_brackets_ipv6_only() -> None:
    assert str(HostPort.parse_authority("[2001:db8::1]:443")) == "[2001:db8::1]:443"
    assert str(HostPort.parse_authority("Example.com:80")) == "example.com:80"
    assert str(HostPort.parse_authority("192.0.2.1:8080")) == "192.0.2.1:8080"


def test_hostport_is_ip() -> None:
    assert HostPort.parse_authority("192.0.2.1:1").is_ip
    assert HostPort.parse_authority("[::1]:1").is_ip
    assert not HostPort.parse_authority("example.com:1").is_ip


def test_hostport_is_frozen_and_validates() -> None:
    hp = HostPort("example.com", 443)
    with pytest.raises(dataclasses.FrozenInstanceError):
        hp.port = 80  # type: ignore[misc]
    with pytest.raises(ClientProtocolError):
        HostPort("example.com", 0)
    with pytest.raises(ClientProtocolError):
        HostPort("", 443)


# ------------------------------------------------------------------------------ normalize_host

NORMALIZE_OK = [
    ("example.com", "example.com"),
    ("Example.COM", "example.com"),
    ("example.com.", "example.com"),
    ("WWW.Example.Com.", "www.example.com"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("BÜCHER.example.", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("münchen.de", "xn--mnchen-3ya.de"),
    ("127.0.0.1", "127.0.0.1"),
    ("8.8.8.8", "8.8.8.8"),
    ("2001:DB8::1", "2001:db8::1"),
    ("2001:db8:0000:0000::0001", "2001:db8::1"),
    ("123.example", "123.example"),  # digits in a label are fine when another label is a name
    ("0xdead.example", "0xdead.example"),
    ("localhost", "localhost"),
]


@pytest.mark.parametrize(("raw", "expected"), NORMALIZE_OK, ids=[c[0] for c in NORMALIZE_OK])
def test_normalize_host(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


NORMALIZE_BAD = [
    "2130706433",  # 127.0.0.1 as one 32-bit number
    "0x7f.1",  # hex + short form
    "0x7F.0.0.1",
    "0177.0.0.1",  # octal first octet
    "127.1",  # short form
    "127.0.1",
    "0x7f000001",
    "127.0.0.1.",  # dotted quad with a trailing dot is not a clean literal
    "1.2.3.4.5",
    "",
    ".",
    "fe80::1%eth0",
    "exa mple",
    "under@score",
    "-x.example",
    "x-.example",
    "a..example",
]


@pytest.mark.parametrize("raw", NORMALIZE_BAD, ids=[repr(c) for c in NORMALIZE_BAD])
def test_normalize_host_refuses(raw: str) -> None:
    with pytest.raises(ClientProtocolError) as info:
        normalize_host(raw)
    assert info.value.reason == "bad_host"


@pytest.mark.parametrize("raw", ["\uff11\uff12\uff17\uff0e\uff11", "0x7f\u30021"])  # "１２７．１", "0x7f。1"
def test_normalize_host_refuses_numeric_forms_hidden_behind_idna(raw: str) -> None:
    with pytest.raises(ClientProtocolError):
        normalize_host(raw)


# ------------------------------------------------------------------------------ DestPattern.parse

PATTERNS = [
    # (text, kind, value, port)
    ("*", "any", "*", None),
    ("*:443", "any", "*", 443),
    ("example.com", "exact", "example.com", None),
    ("Example.COM.", "exact", "example.com", None),
    ("api.example.com:8443", "exact", "api.example.com", 8443),
    ("*.example.com", "suffix", ".example.com", None),
    ("*.Example.com:443", "suffix", ".example.com", 443),
    ("*.bücher.example", "suffix", ".xn--bcher-kva.example", None),
    ("203.0.113.7", "net", "203.0.113.7/32", None),
    ("203.0.113.7:443", "net", "203.0.113.7/32", 443),
    ("203.0.113.0/24", "net", "203.0.113.0/24", None),
    ("203.0.113.9/24", "net", "203.0.113.0/24", None),  # host bits dropped
    ("203.0.113.0/24:443", "net", "203.0.113.0/24", 443),
    ("2001:db8::/32", "net", "2001:db8::/32", None),
    ("[2001:db8::/32]", "net", "2001:db8::/32", None),
    ("[2001:db8::/32]:443", "net", "2001:db8::/32", 443),
    ("[2001:db8::1]:443", "net", "2001:db8::1/128", 443),
]


@pytest.mark.parametrize(("text", "kind", "value", "port"), PATTERNS, ids=[c[0] for c in PATTERNS])
def test_dest_pattern_parse(text: str, kind: str, value: str, port: int | None) -> None:
    p = DestPattern.parse(text)
    assert (p.kind, p.value, p.port) == (kind, value, port)


PATTERNS_BAD = [
    "",
    "   ",
    "example.com:",
    "example.com:http",
    "example.com:0",
    "example.com:70000",
    "[2001:db8::/32",
    "[2001:db8::/32]443",
    "[2001:db8::/32]:x",
    "foo.*.example.com",
    "*example.com",
    "**.example.com",
    "*.",
    "exa mple.com",
    "127.1",
    "2130706433",
]


@pytest.mark.parametrize("text", PATTERNS_BAD, ids=[repr(c) for c in PATTERNS_BAD])
def test_dest_pattern_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        DestPattern.parse(text)


# ------------------------------------------------------------------------------ UpstreamProxy.parse

def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


UPSTREAMS = [
    # (url, host, port, authorization)
    ("http://egress-b.internal:3128", "egress-b.internal", 3128, None),
    ("http://egress-b.internal", "egress-b.internal", 3128, None),  # default port
    ("http://egress-b.internal:8080/", "egress-b.internal", 8080, None),
    ("http://Proxy.Example:8080", "proxy.example", 8080, None),
    ("http://[2001:db8::5]:3128", "2001:db8::5", 3128, None),
    ("http://10.0.0.5:3128", "10.0.0.5", 3128, None),
    ("http://user:pass@egress-b.internal:3128", "egress-b.internal", 3128, _basic("user", "pass")),
    ("http://us%40er:p%3Ass@h.example:1", "h.example", 1, _basic("us@er", "p:ss")),
    ("http://user@h.example:1", "h.example", 1, _basic("user", "")),
]


@pytest.mark.parametrize(("url", "host", "port", "auth"), UPSTREAMS, ids=[c[0] for c in UPSTREAMS])
def test_upstream_proxy_parse(url: str, host: str, port: int, auth: str | None) -> None:
    up = UpstreamProxy.parse(url)
    assert (up.address.host, up.address.port, up.authorization) == (host, port, auth)


def test_upstream_proxy_str_hides_credentials() -> None:
    up = UpstreamProxy.parse("http://user:secret@h.example:3128")
    assert str(up) == "http://h.example:3128"
    assert "secret" not in str(up)


UPSTREAMS_BAD = [
    "https://h.example:3128",
    "socks5://h.example:1080",
    "h.example:3128",
    "http://h.example:3128/path",
    "http://h.example:3128?q=1",
    "http://h.example:3128#frag",
    "http://:3128",
    "http://h.example:0",
    "http://h.example:99999",
    "http://127.1:3128",
]


@pytest.mark.parametrize("url", UPSTREAMS_BAD)
def test_upstream_proxy_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        UpstreamProxy.parse(url)
