"""Playbooks for the SOCKS5 phase (``proxy.socks``) on the same harness as the HTTP ones
(``tests/unit/playbook.py``): a ``protocol: socks5`` connection driven event by event, asserting
the exact reply bytes, what reaches the origin, the flow calls and the access records. No socket.

Each playbook reads as a conversation: the client's greeting, its request, the gateway's reply,
then the relayed bytes, as RFC 1928 lays them out."""

from __future__ import annotations

import socket
import struct

import pytest

from egressgate.errors import ConnectRefused, UpstreamTimeout
from egressgate.policy.passwords import hash_password
from egressgate.proxy.listeners import ListenerInfo
from tests.unit.playbook import CONFIG, EGRESS_ADDR, LISTENER, Play

GREETING = b"\x05\x01\x00"  # version 5, one method: no authentication
NO_AUTH = b"\x05\x00"


def connect_request(ip: str = "203.0.113.9", port: int = 443, cmd: int = 1, rsv: int = 0) -> bytes:
    return bytes([5, cmd, rsv, 1]) + socket.inet_aton(ip) + struct.pack("!H", port)


def reply(code: int, ip: str = "0.0.0.0", port: int = 0) -> bytes:
    return bytes([5, code, 0, 1]) + socket.inet_aton(ip) + struct.pack("!H", port)


SUCCEEDED = reply(0, EGRESS_ADDR, 40000)  # BND: the egress address and port of the upstream connection


def socks_play(config: str = CONFIG) -> Play:
    p = Play(config)
    p.listener = ListenerInfo(LISTENER, False, p.metrics.listener(LISTENER), protocol="socks5")
    return p


@pytest.fixture
def play():
    p = socks_play()
    yield p
    p.close()
    assert not p.bugs, f"the gateway caught bugs: {p.bugs}"


def opened(p: Play):
    """A client with an open SOCKS5 tunnel to 203.0.113.9:443 (the replies already taken)."""
    conn, t = p.client()
    t.receive(GREETING)
    assert t.take() == NO_AUTH
    t.receive(connect_request())
    p.settle()
    assert t.take() == SUCCEEDED
    return (conn, t, *p.upstream())


def test_a_tunnel_relays_both_ways_and_ends_with_one_record(play):
    conn, t, up, ut = opened(play)
    assert play.dialer.calls == [(("203.0.113.9",), 443)]
    assert play.gauge("active_tunnels") == 1
    t.receive(b"hello")
    assert ut.take() == b"hello"
    up.data_received(b"world!")
    assert t.take() == b"world!"
    assert play.outcomes() == []
    t.receive_eof()  # the client is done sending: the half-close goes on to the origin
    assert ut.calls == ["write_eof"] and t.calls == []
    ut.receive_eof()
    ut.peer_lost()
    play.settle()
    assert t.calls == ["close"]
    assert play.outcomes() == [("SOCKS5", 200, "", 5, 6)]
    rec = play.log.records[0]
    assert (rec.client, rec.profile, rec.target, rec.upstream_addr, rec.egress_addr) == (
        "local", "default", "203.0.113.9:443", "203.0.113.9", EGRESS_ADDR)
    play.assert_all_closed()


def test_the_negotiation_may_arrive_one_byte_at_a_time(play):
    conn, t = play.client()
    for b in GREETING:
        t.receive(bytes([b]))
    assert t.take() == NO_AUTH
    for b in connect_request():
        assert play.dialer.calls == []
        t.receive(bytes([b]))
    play.settle()
    assert t.take() == SUCCEEDED and play.dialer.calls == [(("203.0.113.9",), 443)]


def test_greeting_request_and_first_flight_in_one_segment(play):
    """An eager client (no round trip waited for): the early data is held until the tunnel opens,
    then sent up first, in order."""
    conn, t = play.client()
    t.receive(GREETING + connect_request() + b"\x16\x03\x01early")
    play.settle()
    assert t.take() == NO_AUTH + SUCCEEDED
    up, ut = play.upstream()
    assert ut.take() == b"\x16\x03\x01early"
    t.receive(b"more")
    assert ut.take() == b"more"


@pytest.mark.parametrize("request_bytes,code,reason,status", [
    (connect_request("203.0.113.66"), 2, "destination_denied", 403),  # the client's deny rule
    (connect_request(port=22), 2, "socks_port_not_allowed", 403),  # not in security.socks_ports
    (connect_request("127.0.0.1"), 2, "destination_ip_prohibited", 403),  # the address guard
    (connect_request(cmd=2), 7, "socks_command", 400),  # BIND
    (connect_request(cmd=3), 7, "socks_command", 400),  # UDP ASSOCIATE
], ids=["deny-rule", "port", "guard", "bind", "udp-associate"])
def test_a_refused_request_gets_its_reply_code_and_no_dial(play, request_bytes, code, reason, status):
    conn, t = play.client()
    t.receive(GREETING + request_bytes)
    play.settle()
    assert t.take() == NO_AUTH + reply(code)
    assert play.dialer.calls == []
    assert t.calls == ["write_eof"]  # the reply is the last thing sent; the client closes
    assert play.outcomes() == [("SOCKS5", status, reason, 0, 0)]
    t.receive_eof()
    play.settle()
    play.assert_all_closed()


@pytest.mark.parametrize("err,code,reason", [
    (ConnectRefused("203.0.113.9:443: connection refused"), 5, "connection_refused"),
    (UpstreamTimeout("203.0.113.9:443: timed out"), 6, "connect_timeout"),  # 6: "TTL expired", as Dante
], ids=["refused", "timeout"])
def test_a_failed_dial_answers_with_the_matching_reply(play, err, code, reason):
    play.dialer.failures.append(err)
    conn, t = play.client()
    t.receive(GREETING + connect_request())
    play.settle()
    assert t.take() == NO_AUTH + reply(code)
    assert [o[:3] for o in play.outcomes()] == [("SOCKS5", 502 if code == 5 else 504, reason)]
    t.receive_eof()
    play.settle()
    play.assert_all_closed()


def test_the_client_leaving_while_the_dial_waits_cancels_it_and_leaks_nothing(play):
    play.dialer.hold()
    conn, t = play.client()
    t.receive(GREETING + connect_request())
    play.settle()
    assert play.dialer.calls == [(("203.0.113.9",), 443)]
    t.peer_lost(ConnectionResetError())
    play.settle()
    play.dialer.release()
    play.settle()
    assert play.dialer.upstreams == []  # the dial never completed a connection for nobody
    assert [o[:2] for o in play.outcomes()] == [("SOCKS5", 499)]
    play.assert_all_closed()


def test_the_origin_resetting_ends_the_tunnel_and_the_client_connection(play):
    conn, t, up, ut = opened(play)
    up.data_received(b"x" * 10)
    ut.peer_lost(ConnectionResetError())
    play.settle()
    assert t.take() == b"x" * 10
    assert t.calls and t.calls[-1] in ("close", "abort")
    assert [o[:2] for o in play.outcomes()] == [("SOCKS5", 200)]
    play.assert_all_closed()


def test_a_socks4_client_gets_a_socks4_refusal_and_a_record(play):
    conn, t = play.client()
    t.receive(b"\x04\x01\x01\xbb\xcb\x00q\x09\x00")
    play.settle()
    assert t.take()[:2] == b"\x00\x5b"  # SOCKS4 "request rejected": the client can say why
    assert play.outcomes() == [("SOCKS5", 400, "socks_version", 0, 0)]


def test_no_acceptable_method_when_credentials_are_required():
    config = f"""
listen: [{{address: "127.0.0.1:3128", protocol: socks5}}]
clients:
  - name: job
    from: [127.0.0.0/8]
    username: job
    password_hash: "{hash_password('a long enough password')}"
"""
    p = socks_play(config)
    try:
        conn, t = p.client()
        t.receive(GREETING)  # offers "no authentication" only
        p.settle()
        assert t.take() == b"\x05\xff"
        assert p.dialer.calls == []
        assert [o[:3] for o in p.outcomes()] == [("SOCKS5", 407, "socks_no_acceptable_method")]
    finally:
        p.close()
    assert not p.bugs
