"""The SOCKS5 negotiation machine (``egressgate.socks5``), with no sockets: whole
conversations fed byte by byte and at once, each bad message with its reply and reason, and
the mapping from the gateway's typed refusals to SOCKS reply codes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressgate.errors import (
    AddressProhibited,
    AuthRequired,
    ClientProtocolError,
    ConnectRefused,
    DnsError,
    EgressUnverified,
    LimitReached,
    PolicyDenied,
    UpstreamError,
    UpstreamTimeout,
)
from egressgate.socks5 import (
    METHOD_NO_AUTH,
    METHOD_NONE_ACCEPTABLE,
    METHOD_USERPASS,
    ConnectRequest,
    Credentials,
    MethodsOffered,
    ServerNegotiation,
    SocksProtocolError,
    State,
    basic_authorization,
    reply_code,
)
from egressgate.socks5.machine import MAX_PENDING, reply_bytes

GREETING = b"\x05\x02\x00\x02"
AUTH = b"\x01\x03job\x06secret"
REQ_DOMAIN = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"
REQ_V4 = b"\x05\x01\x00\x01\xcb\x00\x71\x07\x00\x16"
REQ_V6 = b"\x05\x01\x00\x04" + bytes(15) + b"\x01" + b"\x00\x50"


def _events(m: ServerNegotiation, data: bytes, one_by_one: bool):
    """Feed ``data`` and answer each event as a driver would; returns (events, bytes sent)."""
    events, sent = [], b""
    chunks = [data[i:i + 1] for i in range(len(data))] if one_by_one else [data]
    for chunk in chunks:
        m.receive(chunk)
        while (ev := m.next_event()) is not None:
            events.append(ev)
            if isinstance(ev, MethodsOffered):
                sent += m.choose_method(METHOD_USERPASS if METHOD_USERPASS in ev.methods else METHOD_NO_AUTH)
            elif isinstance(ev, Credentials):
                sent += m.auth_result(True)
            elif isinstance(ev, ConnectRequest):
                sent += m.reply(0, ("192.0.2.1", 4242))
                return events, sent
    return events, sent


@pytest.mark.parametrize("one_by_one", [False, True], ids=["at-once", "byte-by-byte"])
@pytest.mark.parametrize("request_bytes, dest", [
    (REQ_DOMAIN, "example.com:443"), (REQ_V4, "203.0.113.7:22"), (REQ_V6, "[::1]:80"),
], ids=["domain", "ipv4", "ipv6"])
def test_whole_conversation(request_bytes: bytes, dest: str, one_by_one: bool) -> None:
    m = ServerNegotiation()
    events, sent = _events(m, GREETING + AUTH + request_bytes + b"early", one_by_one)
    assert events[0] == MethodsOffered(frozenset({0, 2}))
    assert events[1] == Credentials(b"job", b"secret")
    assert str(events[2].dest) == dest
    assert sent == b"\x05\x02" + b"\x01\x00" + b"\x05\x00\x00\x01\xc0\x00\x02\x01\x10\x92"
    assert m.state is State.DONE
    if not one_by_one:
        assert m.rest() == b"early"


def test_no_auth_method_skips_credentials() -> None:
    m = ServerNegotiation()
    m.receive(b"\x05\x01\x00" + REQ_V4)
    assert m.next_event() == MethodsOffered(frozenset({0}))
    assert m.next_event() is None  # the driver owes the method choice first
    assert m.choose_method(METHOD_NO_AUTH) == b"\x05\x00"
    assert isinstance(m.next_event(), ConnectRequest)


def test_none_acceptable_ends_the_negotiation() -> None:
    m = ServerNegotiation()
    m.receive(b"\x05\x01\x00")
    m.next_event()
    assert m.choose_method(METHOD_NONE_ACCEPTABLE) == b"\x05\xff"
    assert m.state is State.FAILED


def test_failed_authentication() -> None:
    m = ServerNegotiation()
    m.receive(GREETING + AUTH)
    m.next_event()
    m.choose_method(METHOD_USERPASS)
    assert m.next_event() == Credentials(b"job", b"secret")
    assert m.auth_result(False) == b"\x01\x01"
    assert m.state is State.FAILED


def test_failure_reply_ends_it() -> None:
    m = ServerNegotiation()
    m.receive(b"\x05\x01\x00" + REQ_DOMAIN)
    m.next_event()
    m.choose_method(METHOD_NO_AUTH)
    m.next_event()
    assert m.reply(0x02) == b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00"
    assert m.state is State.FAILED


OK_METHOD = b"\x05\x01\x00"


@pytest.mark.parametrize("data, reply, reason", [
    (b"\x04\x01\x00\x50", b"\x00\x5b" + bytes(6), "socks_version"),
    (b"GET / HTTP/1.1\r\n", b"", "socks_version"),
    (b"\x05\x00", b"\x05\xff", "socks_no_method"),
    (OK_METHOD + b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50", reply_bytes(0x07), "socks_command"),
    (OK_METHOD + b"\x05\x03\x00\x01\x7f\x00\x00\x01\x00\x50", reply_bytes(0x07), "socks_command"),
    (OK_METHOD + b"\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50", reply_bytes(0x07), "socks_command"),
    (OK_METHOD + b"\x05\x01\x00\x02", reply_bytes(0x08), "socks_address_type"),
    (OK_METHOD + b"\x04", reply_bytes(0x01), "socks_version"),
    (OK_METHOD + b"\x05\x01\x00\x03\x00\x00\x50", reply_bytes(0x01), "bad_host"),
    (OK_METHOD + b"\x05\x01\x00\x03\x03a:b\x00\x50", reply_bytes(0x01), "bad_host"),
    (OK_METHOD + b"\x05\x01\x00\x03\x03\xc3\xa9x\x00\x50", reply_bytes(0x01), "bad_host"),
    (OK_METHOD + b"\x05\x01\x00\x03\x0a2130706433\x00\x50", reply_bytes(0x01), "bad_host"),
    (OK_METHOD + b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x00", reply_bytes(0x01), "bad_port"),
    (b"\x05\x01\x02\x02\x03job\x00", b"\x01\x01", "socks_auth_version"),
    (b"\x05\x01\x02\x01\x00\x00", b"\x01\x01", "bad_credentials"),
    # RFC 1928 section 4: RSV is X'00'; anything else is answered (general failure) and closed
    (OK_METHOD + b"\x05\x01\x01\x01\x7f\x00\x00\x01\x00\x50", reply_bytes(0x01), "socks_reserved"),
    (OK_METHOD + b"\x05\x01\xff\x03\x01a\x00\x50", reply_bytes(0x01), "socks_reserved"),
    (OK_METHOD + b"\x05\x01\x80\x01", reply_bytes(0x01), "socks_reserved"),  # before the address comes
], ids=["socks4", "http", "no-methods", "bind", "udp", "unknown-command", "address-type", "request-version",
        "empty-name", "colon-in-name", "non-ascii-name", "numeric-name", "port-0", "auth-version", "empty-user",
        "rsv-1", "rsv-ff-name", "rsv-head-only"])
def test_bad_messages(data: bytes, reply: bytes, reason: str) -> None:
    m = ServerNegotiation()
    m.receive(data)
    with pytest.raises(SocksProtocolError) as info:
        while (ev := m.next_event()) is not None:
            if isinstance(ev, MethodsOffered):
                m.choose_method(min(ev.methods))
    assert info.value.reply_bytes == reply
    assert info.value.reason == reason
    assert info.value.status == 400
    assert m.state is State.FAILED


def test_truncated_messages_wait_for_more() -> None:
    for cut in range(1, len(GREETING)):
        m = ServerNegotiation()
        m.receive(GREETING[:cut])
        assert m.next_event() is None


def test_pending_bytes_are_bounded() -> None:
    m = ServerNegotiation()
    m.receive(b"\x05\x01\x02")
    m.next_event()
    m.choose_method(METHOD_USERPASS)
    m.receive(AUTH)
    m.next_event()  # the credentials: while they are checked, the client keeps sending
    with pytest.raises(SocksProtocolError) as info:
        m.receive(b"x" * (MAX_PENDING + 1))
    assert info.value.reason == "socks_oversized"


def test_answers_out_of_turn_are_bugs() -> None:
    m = ServerNegotiation()
    with pytest.raises(RuntimeError):
        m.reply(0)
    with pytest.raises(RuntimeError):
        m.auth_result(True)


def test_credentials_never_show_the_password() -> None:
    assert "secret" not in repr(Credentials(b"job", b"secret"))


@pytest.mark.parametrize("err, code", [
    (PolicyDenied("x", reason="destination_not_allowed"), 0x02),
    (AddressProhibited("x"), 0x02),
    (AuthRequired("x"), 0x02),
    (LimitReached("x"), 0x02),
    (DnsError("x"), 0x04),
    (UpstreamError("x", reason="unreachable"), 0x04),
    (ConnectRefused("x"), 0x05),
    (UpstreamTimeout("x"), 0x06),
    (UpstreamTimeout("x", reason="dns_timeout"), 0x06),
    (UpstreamError("x", reason="upstream_timeout"), 0x06),
    (UpstreamError("x", reason="upstream_refused"), 0x01),
    (EgressUnverified("x"), 0x01),
    (ClientProtocolError("x"), 0x01),
], ids=lambda v: v if isinstance(v, int) else f"{type(v).__name__}-{v.reason}")
def test_reply_codes(err, code: int) -> None:
    assert reply_code(err) == code


def test_credentials_as_basic() -> None:
    assert basic_authorization(Credentials(b"job+ip-b", b"p:w")) == b"Basic am9iK2lwLWI6cDp3"
    assert basic_authorization(Credentials(b"a:b", b"x")) is None


def test_bound_address_in_reply() -> None:
    assert reply_bytes(0, ("::ffff:10.0.0.1", 80)) == b"\x05\x00\x00\x01\x0a\x00\x00\x01\x00\x50"
    assert reply_bytes(0, ("2001:db8::1", 1)) == b"\x05\x00\x00\x04" + bytes.fromhex("20010db8" + "0" * 22 + "01") \
        + b"\x00\x01"


@given(st.lists(st.binary(max_size=64), max_size=40), st.sampled_from([METHOD_NO_AUTH, METHOD_USERPASS]))
@settings(max_examples=400, deadline=None)
def test_any_bytes_end_in_an_event_a_wait_or_a_protocol_error(chunks: list[bytes], method: int) -> None:
    """Whatever a client sends, in whatever pieces: the machine yields events, waits for more,
    or raises SocksProtocolError (never another exception), and holds at most MAX_PENDING."""
    m = ServerNegotiation()
    try:
        for chunk in chunks:
            if m.state is State.DONE:
                break
            m.receive(chunk)
            while (ev := m.next_event()) is not None:
                if isinstance(ev, MethodsOffered):
                    m.choose_method(method)
                elif isinstance(ev, Credentials):
                    m.auth_result(True)
                else:
                    assert 0 < ev.dest.port < 65536
                    m.reply(0)
                    break
            assert len(m.buf) <= MAX_PENDING
    except SocksProtocolError as err:
        assert m.state is State.FAILED and err.status == 400
