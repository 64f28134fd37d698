"""Playbooks for the asyncio driver (``proxy.session``, ``pipeline``, ``forward``, ``tunnel``):
a client connection, its exchanges and its tunnel driven event by event with fake transports
and a fake dialer (``tests/unit/playbook.py``), asserting the exact bytes each side is sent,
each pause and resume, and the access records. No socket is opened.

Each playbook reads as a conversation: what the client sends (``t.receive``), what the origin
sends (``up.data_received`` / ``ut.receive_eof`` / ``ut.peer_lost``), and after each step what
the other side saw (``take()``: the bytes written since the last look; ``calls``: flow calls).
"""

from __future__ import annotations

import gc
import json

import pytest

from egressgate.errors import ConnectRefused, UpstreamError, UpstreamTimeout
from egressgate.proxy.flow import BUFFER_LIMIT, NOT_PAUSED, Pause
from egressgate.proxy.session import LINGER_BYTES
from tests.unit.playbook import EGRESS_ADDR, Play

CONNECT_OK = b"HTTP/1.1 200 Connection established\r\n\r\n"


@pytest.fixture
def play():
    p = Play()
    yield p
    p.close()
    assert not p.bugs, f"the gateway caught bugs: {p.bugs}"


def get(path: str, host: str = "203.0.113.9") -> bytes:
    return b"GET http://%s%s HTTP/1.1\r\nHost: %s\r\n\r\n" % (host.encode(), path.encode(), host.encode())


def sent_up(path: str, host: str = "203.0.113.9") -> bytes:
    """The head of ``get(path)`` as the origin receives it."""
    return b"GET %s HTTP/1.1\r\nHost: %s\r\nVia: 1.1 egressgate\r\n\r\n" % (path.encode(), host.encode())


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def ok_down(body: bytes) -> bytes:
    """``ok(body)`` as a keep-alive client receives it."""
    return b"HTTP/1.1 200 OK\r\nVia: 1.1 egressgate\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s" % (
        len(body), body)


def error(status: bytes, proxy_status: str, detail: str, keep: bool = False) -> bytes:
    """An answer of the gateway's own, byte for byte (``http1.responses.error_response``)."""
    body = b"%s: %s\n" % (status, detail.encode())
    return (b"HTTP/1.1 %s\r\nProxy-Status: egressgate; error=%s; details=\"%s\"\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: %s\r\n\r\n%s") % (
        status, proxy_status.encode(), detail.encode(), len(body), b"keep-alive" if keep else b"close", body)


def forwarding(p: Play, request: bytes):
    """A client whose request reached the origin: (conn, client transport, upstream, its transport)."""
    conn, t = p.client()
    t.receive(request)
    p.settle()
    return (conn, t, *p.upstream())


def origin_goes(ut, how: str) -> None:
    """The origin closes its connection ("eof": a FIN, then the close) or resets it ("reset")."""
    if how == "eof":
        ut.receive_eof()
    ut.peer_lost(ConnectionResetError() if how == "reset" else None)


def tunnel(p: Play):
    """A client with an open tunnel to 203.0.113.9:443 (``CONNECT_OK`` already taken)."""
    conn, t = p.client()
    t.receive(b"CONNECT 203.0.113.9:443 HTTP/1.1\r\nHost: 203.0.113.9:443\r\n\r\n")
    p.settle()
    assert t.take() == CONNECT_OK
    return (conn, t, *p.upstream())


# --------------------------------------------------------------------------- forwarding

def test_a_forwarded_get_is_rewritten_and_its_response_relayed(play):
    """Origin-form target, Host from the URI, hop-by-hop fields (and those Connection names)
    removed, Via appended; the response re-framed for the client; one record; the upstream
    connection kept for reuse."""
    conn, t = play.client()
    t.receive(b"GET http://203.0.113.9/x?y=1 HTTP/1.1\r\nHost: 203.0.113.9\r\nConnection: keep-alive, X-Hop\r\n"
              b"X-Hop: 1\r\nKeep-Alive: timeout=9\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
              b"Accept: */*\r\nVia: 1.0 corp\r\n\r\n")
    assert play.dialer.calls == []  # the dial is a task: nothing happens inside the read
    play.settle()
    assert play.dialer.calls == [(("203.0.113.9",), 80)]
    up, ut = play.upstream()
    assert ut.take() == b"GET /x?y=1 HTTP/1.1\r\nHost: 203.0.113.9\r\nAccept: */*\r\nVia: 1.0 corp, 1.1 egressgate\r\n\r\n"
    assert t.take() == b""
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nKeep-Alive: timeout=5\r\nServer: o\r\n\r\nhel")
    assert t.take() == b"HTTP/1.1 200 OK\r\nServer: o\r\nVia: 1.1 egressgate\r\nContent-Length: 5\r\n" \
                       b"Connection: keep-alive\r\n\r\nhel"
    assert play.outcomes() == []
    up.data_received(b"lo")
    assert t.take() == b"lo"
    assert play.outcomes() == [("GET", 200, "", 0, 5)]
    rec = play.log.records[0]
    assert (rec.client, rec.profile, rec.target, rec.upstream_addr, rec.egress_addr) == (
        "local", "default", "http://203.0.113.9/x?y=1", "203.0.113.9", EGRESS_ADDR)
    assert len(play.gw.connector.pool) == 1 and ut.calls == [] and t.calls == []
    t.receive_eof()  # an idle keep-alive client leaves
    play.settle()
    assert t.calls == ["close"]
    play.assert_all_closed()


def test_pipelined_requests_are_served_in_order_on_one_upstream(play):
    """The second request goes up only once the first response is complete, on the same
    (pooled) connection; responses come back in order."""
    conn, t, up, ut = forwarding(play, get("/1") + get("/2"))
    assert ut.take() == sent_up("/1")
    assert len(conn.http.queue) == 2
    up.data_received(ok(b"one")[:-1])
    assert ut.take() == b""  # not before the first response is complete
    up.data_received(b"e")
    assert t.take() == ok_down(b"one")
    assert ut.take() == sent_up("/2")  # at once: the idle connection is taken from the pool
    assert play.connects == [("203.0.113.9:80", False, False)] and len(play.dialer.calls) == 1
    up.data_received(ok(b"two"))
    assert t.take() == ok_down(b"two")
    assert play.outcomes() == [("GET", 200, "", 0, 3), ("GET", 200, "", 0, 3)]
    assert [r.target for r in play.log.records] == ["http://203.0.113.9/1", "http://203.0.113.9/2"]


@pytest.mark.parametrize("how", ["eof", "reset"])
def test_a_reused_connection_that_fails_before_answering_is_retried_once_fresh(play, how):
    """A pooled connection the origin had closed: the request is sent again on a new
    connection, and the client never sees the failure."""
    conn, t, up, ut = forwarding(play, get("/1"))
    assert ut.take() == sent_up("/1")
    up.data_received(ok(b"one"))
    assert t.take() == ok_down(b"one") and len(play.gw.connector.pool) == 1
    t.receive(get("/2"))
    assert ut.take() == sent_up("/2")  # reused: no dial
    origin_goes(ut, how)  # the origin had timed the idle connection out
    assert "abort" in ut.calls and t.take() == b""
    play.settle()
    assert play.connects == [("203.0.113.9:80", False, False), ("203.0.113.9:80", False, True)]
    up2, ut2 = play.upstream()
    assert up2 is not up and ut2.take() == sent_up("/2")
    up2.data_received(ok(b"two"))
    assert t.take() == ok_down(b"two")
    assert play.outcomes() == [("GET", 200, "", 0, 3), ("GET", 200, "", 0, 3)]


def test_a_reused_connection_is_not_retried_for_a_request_with_a_body(play):
    """The body may already have been consumed: a 502, not a second attempt."""
    conn, t, up, ut = forwarding(play, get("/1"))
    up.data_received(ok(b"one"))
    t.receive(b"POST http://203.0.113.9/2 HTTP/1.1\r\nHost: 203.0.113.9\r\nContent-Length: 2\r\n\r\nhi")
    assert ut.take() == sent_up("/1") + b"POST /2 HTTP/1.1\r\nHost: 203.0.113.9\r\nVia: 1.1 egressgate\r\n" \
                                        b"Content-Length: 2\r\n\r\nhi"  # on the reused connection
    origin_goes(ut, "reset")
    play.settle()
    assert len(play.connects) == 1
    assert t.take() == ok_down(b"one") + error(b"502 Upstream Closed Connection", "http_response_incomplete",
                                                "the origin closed the connection before the response was complete")
    assert play.outcomes()[1:] == [("POST", 502, "upstream_closed", 2, 0)]


def test_whoami_is_answered_by_the_gateway_itself(play):
    conn, t = play.client()
    t.receive(b"GET http://egressgate.whoami/ HTTP/1.1\r\nHost: egressgate.whoami\r\n\r\n")
    head, _, body = t.take().partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [b"HTTP/1.1 200 OK", b"Content-Type: application/json",
                                   b"Content-Length: %d" % len(body), b"Cache-Control: no-store",
                                   b"Connection: keep-alive"]
    doc = json.loads(body)
    assert (doc["client"], doc["client_addr"], doc["profile"], doc["deny"]) == (
        "local", "127.0.0.1", "default", ["203.0.113.66"])
    play.settle()
    assert play.connects == [] and play.dialer.calls == []
    assert play.outcomes() == [("GET", 200, "", 0, len(head) + 4 + len(body))]
    assert t.calls == []  # kept alive


# --------------------------------------------------------------------------- tunnels

@pytest.mark.parametrize("server", ["says_and_closes", "closes", "resets"])
def test_a_server_that_leaves_before_the_tunnel_is_up_ends_the_tunnel(play, server):
    """What the server did between its connection being made and the tunnel taking it (one
    loop turn: the dial's task resumes) reaches the tunnel: its banner, then its EOF or reset.
    The EOF used to be taken for an idle connection's, the transport closed with nobody told:
    the client kept a tunnel to nowhere until tunnel_idle."""
    def at_once(ut):
        if server == "says_and_closes":
            ut.receive(b"421 busy\r\n")
            ut.receive_eof()
        elif server == "closes":
            ut.receive_eof()
        else:
            ut.peer_lost(ConnectionResetError())

    play.dialer.at_once = at_once
    conn, t = play.client()
    t.receive(b"CONNECT 203.0.113.9:443 HTTP/1.1\r\nHost: 203.0.113.9:443\r\n\r\n")
    play.settle()
    banner = b"421 busy\r\n" if server == "says_and_closes" else b""
    assert t.take() == CONNECT_OK + banner
    if server == "resets":
        assert t.calls == ["abort"]  # a reset is passed on as one
        assert [(o[0], o[1], o[2]) for o in play.outcomes()] == [("CONNECT", 200, "upstream_reset")]
    else:
        assert t.calls == ["write_eof"]  # the server's end, passed on: the client may still send
        t.receive_eof()
        assert t.calls == ["write_eof", "close"]
        assert play.outcomes() == [("CONNECT", 200, "", 0, len(banner))]
    play.settle()
    play.assert_all_closed()


def test_connect_with_early_data_then_half_closes_both_ways(play):
    """Bytes that came with the CONNECT head go up right after the 200; each side's EOF
    half-closes the other; the tunnel ends when both directions are done."""
    conn, t = play.client()
    t.receive(b"CONNECT 203.0.113.9:443 HTTP/1.1\r\nHost: 203.0.113.9:443\r\n\r\nhello")
    assert t.take() == b"" and play.dialer.calls == []
    play.settle()
    assert play.connects == [("203.0.113.9:443", True, False)]
    up, ut = play.upstream()
    assert t.take() == CONNECT_OK
    assert ut.take() == b"hello"
    assert play.gauge("active_tunnels") == 1
    t.receive(b" there")
    assert ut.take() == b" there"
    up.data_received(b"welcome")
    assert t.take() == b"welcome"
    t.receive_eof()
    assert ut.calls == ["write_eof"] and t.calls == []
    up.data_received(b"bye")  # the other direction is still open
    assert t.take() == b"bye"
    assert play.outcomes() == []
    ut.receive_eof()
    assert ut.calls == ["write_eof", "close"] and t.calls == ["close"]
    assert play.outcomes() == [("CONNECT", 200, "", 11, 10)]
    play.settle()
    play.assert_all_closed()


@pytest.mark.parametrize(("ending", "reason", "closing"), [
    ("upstream reset", "upstream_reset", "abort"),
    ("client closed", "client_closed", "close"),
], ids=["upstream-reset", "client-closed"])
def test_a_tunnel_cut_by_one_side_closes_the_other(play, ending, reason, closing):
    conn, t, up, ut = tunnel(play)
    t.receive(b"ping")
    up.data_received(b"pong!")
    if ending == "upstream reset":
        ut.peer_lost(ConnectionResetError())
        assert t.calls == [closing]
    else:
        t.peer_lost()
        assert ut.calls == [closing]
    assert play.outcomes() == [("CONNECT", 200, reason, 4, 5)]
    play.settle()
    play.assert_all_closed()


# --------------------------------------------------------------------------- back-pressure

def streaming_request(p: Play):
    """A POST whose body is streaming up (length-framed: body bytes go up unchanged)."""
    s = forwarding(p, b"POST http://203.0.113.9/up HTTP/1.1\r\nHost: 203.0.113.9\r\nContent-Length: 100\r\n\r\n")
    assert s[3].take() == b"POST /up HTTP/1.1\r\nHost: 203.0.113.9\r\nVia: 1.1 egressgate\r\nContent-Length: 100\r\n\r\n"
    return s


def streaming_response(p: Play):
    """A GET whose response body is streaming down (length-framed)."""
    s = forwarding(p, get("/down"))
    s[2].data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    assert s[1].take() == b"HTTP/1.1 200 OK\r\nVia: 1.1 egressgate\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n"
    return s


@pytest.mark.parametrize("stage", [streaming_request, tunnel], ids=["exchange", "tunnel"])
def test_an_upstream_that_stops_reading_pauses_the_client(play, stage):
    conn, t, up, ut = stage(play)
    up.pause_writing()
    assert t.calls == ["pause_reading"] and conn.flow.paused == Pause.UPSTREAM
    t.receive(b"in flight")  # what was already read still goes up
    assert ut.take() == b"in flight"
    up.resume_writing()
    assert t.calls == ["pause_reading", "resume_reading"] and conn.flow.paused == NOT_PAUSED
    assert ut.calls == []


@pytest.mark.parametrize("stage", [streaming_response, tunnel], ids=["exchange", "tunnel"])
def test_a_client_that_stops_reading_pauses_the_upstream(play, stage):
    conn, t, up, ut = stage(play)
    conn.pause_writing()
    assert ut.calls == ["pause_reading"]
    up.data_received(b"in flight")
    assert t.take() == b"in flight"
    conn.resume_writing()
    assert ut.calls == ["pause_reading", "resume_reading"]
    assert t.calls == []


def test_an_upstream_paused_for_a_slow_client_is_not_pooled(play):
    """The response ended while the origin's connection was not being read: it could not
    notice the origin closing it, so it is closed, not kept."""
    conn, t, up, ut = streaming_response(play)
    conn.pause_writing()
    up.data_received(b"x" * 100)
    assert t.take() == b"x" * 100
    assert ut.calls == ["pause_reading", "close"] and len(play.gw.connector.pool) == 0
    assert play.outcomes() == [("GET", 200, "", 0, 100)]
    conn.resume_writing()
    assert ut.calls == ["pause_reading", "close"]  # nothing is resumed: the exchange is over


@pytest.mark.parametrize(("size", "calls"), [
    (BUFFER_LIMIT, []),
    (BUFFER_LIMIT + 1, ["pause_reading", "resume_reading"]),
], ids=["at-the-limit", "over-the-limit"])
def test_request_bytes_held_before_the_upstream_is_ready_are_bounded(play, size, calls):
    """Body bytes that arrive while the dial is under way are held; over BUFFER_LIMIT the
    client is paused (Pause.BUFFERED) until they are sent."""
    play.dialer.hold()
    conn, t = play.client()
    body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    t.receive(b"POST http://203.0.113.9/big HTTP/1.1\r\nHost: 203.0.113.9\r\nContent-Length: %d\r\n\r\n" % (size + 10)
              + body)
    play.settle()
    assert len(play.dialer.calls) == 1 and play.dialer.upstreams == []
    assert t.calls == calls[:1] and conn.flow.held == size
    assert conn.flow.paused == (Pause.BUFFERED if calls else NOT_PAUSED)
    play.dialer.release()
    play.settle()
    up, ut = play.upstream()
    assert ut.take() == b"POST /big HTTP/1.1\r\nHost: 203.0.113.9\r\nVia: 1.1 egressgate\r\nContent-Length: %d\r\n\r\n" % (
        size + 10) + body
    assert t.calls == calls and conn.flow.held == 0 and conn.flow.paused == NOT_PAUSED
    t.receive(b"0123456789")
    assert ut.take() == b"0123456789"
    up.data_received(ok(b""))
    assert play.outcomes() == [("POST", 200, "", size + 10, 0)]


# --------------------------------------------------------------------------- failures

REFUSED = [
    # (target, Proxy-Status error, detail, reason)
    ("203.0.113.66", "http_request_denied",
     "destination_denied: 203.0.113.66:80 for client local (203.0.113.66)", "destination_denied"),
    ("10.0.0.1", "destination_ip_prohibited", "10.0.0.1: private address", "destination_ip_prohibited"),
]


@pytest.mark.parametrize(("host", "proxy_status", "detail", "reason"), REFUSED, ids=["policy", "guard"])
def test_a_request_refused_at_its_head_keeps_the_connection(play, host, proxy_status, detail, reason):
    """403 at once (no dial), keep-alive kept: the next request on the connection is served."""
    conn, t = play.client()
    t.receive(get("/a", host))
    phrase = {"destination_denied": b"403 Destination Denied",
              "destination_ip_prohibited": b"403 Destination IP Prohibited"}[reason]
    assert t.take() == error(phrase, proxy_status, detail, keep=True)
    assert play.outcomes() == [("GET", 403, reason, 0, 0)]
    play.settle()
    assert play.connects == [] and t.calls == []
    t.receive(get("/b"))
    play.settle()
    up, ut = play.upstream()
    assert ut.take() == sent_up("/b")
    up.data_received(ok(b"fine"))
    assert t.take() == ok_down(b"fine")
    assert play.outcomes()[1:] == [("GET", 200, "", 0, 4)]


DIAL_FAILURES = [
    (ConnectRefused("connection to 203.0.113.9:80 refused"), b"502 Destination Refused Connection", "connection_refused"),
    (UpstreamTimeout("connect to 203.0.113.9:80 timed out after 10s"), b"504 Destination Connect Timeout", "connection_timeout"),
    (UpstreamError("203.0.113.9:80 unreachable: no route", reason="unreachable",
                   proxy_status="destination_ip_unroutable"), b"502 Destination Unreachable", "destination_ip_unroutable"),
]


@pytest.mark.parametrize("method", ["GET", "CONNECT"])
@pytest.mark.parametrize(("err", "status", "proxy_status"), DIAL_FAILURES, ids=["refused", "timeout", "unreachable"])
def test_a_dial_failure_is_answered_and_the_connection_closed(play, err, status, proxy_status, method):
    play.dialer.failures.append(err)
    conn, t = play.client()
    t.receive(get("/a") if method == "GET" else b"CONNECT 203.0.113.9:443 HTTP/1.1\r\n\r\nearly")
    play.settle()
    assert t.take() == error(status, proxy_status, err.detail)
    assert t.calls == ["close"] and play.dialer.upstreams == []
    assert play.outcomes() == [(method, int(status[:3]), err.reason, 0, 0)]
    play.settle()
    play.assert_all_closed()


UPSTREAM_ENDINGS = {
    # how the origin goes away -> the record's reason, and the status line's phrase
    "eof": ("upstream_protocol_error", b"502 Bad Response From Upstream"),  # a FIN: the parser finds it truncated
    "reset": ("upstream_closed", b"502 Upstream Closed Connection"),
}


@pytest.mark.parametrize("how", list(UPSTREAM_ENDINGS))
def test_an_origin_that_closes_before_answering_is_a_502(play, how):
    conn, t, up, ut = forwarding(play, get("/a"))
    origin_goes(ut, how)
    reason, status_line = UPSTREAM_ENDINGS[how]
    assert t.take() == error(status_line, "http_response_incomplete",
                             "the origin closed the connection before the response was complete")
    assert t.calls == ["close"] and set(ut.calls) == {"abort"}
    assert play.outcomes() == [("GET", 502, reason, 0, 0)]
    play.settle()
    play.assert_all_closed()


@pytest.mark.parametrize("how", list(UPSTREAM_ENDINGS))
def test_an_origin_that_closes_mid_response_cuts_the_client_short(play, how):
    """Too late for an error answer: the client is closed with the response incomplete; the
    record keeps the origin's status and the bytes relayed."""
    conn, t, up, ut = streaming_response(play)
    up.data_received(b"partial")
    origin_goes(ut, how)
    assert t.take() == b"partial"
    assert t.calls == ["close"] and set(ut.calls) == {"abort"}
    assert play.outcomes() == [("GET", 200, UPSTREAM_ENDINGS[how][0], 0, 7)]
    play.settle()
    play.assert_all_closed()


def test_no_response_in_time_is_a_504(play):
    """The sweeper's tick (called here directly) finds the origin silent past upstream_response."""
    conn, t, up, ut = forwarding(play, get("/slow"))
    conn.tick(play.loop.time() + 59, play.gw.runtime)
    assert t.take() == b""
    conn.tick(play.loop.time() + 61, play.gw.runtime)
    assert t.take() == error(b"504 Origin Response Timeout", "http_response_timeout", "no response from the origin within 60s")
    assert t.calls == ["close"] and set(ut.calls) == {"abort"}
    assert play.outcomes() == [("GET", 504, "response_timeout", 0, 0)]


def test_a_bad_request_head_is_answered_then_lingers(play):
    """400, then the write side is shut (not closed: what the client still sends is read and
    discarded, so the answer is not lost to a reset)."""
    conn, t = play.client()
    t.receive(b"GARBAGE\r\n\r\n")
    assert t.take() == error(b"400 Bad Request", "http_request_error", "malformed request: Invalid method encountered")
    assert t.calls == ["write_eof"]
    assert play.outcomes() == [("-", 400, "bad_request", 0, 0)]
    t.receive(b"GET http://203.0.113.9/ HTTP/1.1\r\n\r\n")  # discarded
    play.settle()
    assert t.take() == b"" and t.calls == ["write_eof"] and play.connects == []
    t.receive(b"x" * LINGER_BYTES)  # past the bound: reset
    assert t.calls == ["write_eof", "abort"]
    play.settle()
    assert len(play.outcomes()) == 1
    play.assert_all_closed()


def test_a_client_lost_mid_request_aborts_the_upstream(play):
    conn, t, up, ut = streaming_request(play)
    t.receive(b"12345")
    assert ut.take() == b"12345"
    t.peer_lost()
    assert ut.calls == ["abort"]
    assert play.outcomes() == [("POST", 499, "client_closed", 5, 0)]
    play.settle()
    play.assert_all_closed()


def test_a_client_lost_during_the_dial_cancels_it(play):
    play.dialer.hold()
    conn, t = play.client()
    t.receive(get("/a"))
    play.settle()
    assert len(play.dialer.calls) == 1
    t.peer_lost()
    play.dialer.release()
    play.settle()
    assert play.dialer.upstreams == []  # the dial was cancelled, not completed
    assert play.outcomes() == [("GET", 499, "client_closed", 0, 0)]
    play.assert_all_closed()


# --- defects these playbooks found (each failed before its fix) ------------------------------

def test_a_client_that_stopped_reading_pauses_the_next_pipelined_upstream(play):
    conn, t, up, ut = forwarding(play, get("/1") + get("/2"))
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")
    conn.pause_writing()          # the client stopped reading: its write buffer is over the high-water mark
    up.data_received(b"lo")       # /1 ends; its paused upstream is closed (not pooled); /2 is dialed
    play.settle()
    up2, ut2 = play.upstream()
    assert ut2.take() == sent_up("/2")
    assert ut2.calls == ["pause_reading"]  # (was []: /2's response read and buffered without bound)


def test_an_exchange_done_while_its_upstream_is_write_paused_resumes_the_client(play):
    conn, t, up, ut = forwarding(play, b"POST http://203.0.113.9/a HTTP/1.1\r\nHost: 203.0.113.9\r\n"
                                       b"Content-Length: 10\r\n\r\n0123456789")
    up.pause_writing()            # the body sits in the upstream's write buffer, over its high-water mark
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")  # the origin answers early, keep-alive
    assert play.outcomes() == [("POST", 200, "", 10, 0)] and len(play.gw.connector.pool) == 1
    assert conn.flow.paused == NOT_PAUSED  # (was Pause.UPSTREAM for good: the pooled upstream has no owner)
    assert t.calls == ["pause_reading", "resume_reading"]


def test_a_client_that_closes_before_its_tunnel_is_up_is_gone(play):
    """A CONNECT's client that sends EOF while the dial is under way is treated as gone, as one
    that resets: the dial is cancelled and the record says 499, so a client cannot leave dials
    running behind it (``test_faults``' dialing-clients case, from the outside). A half-closing
    ``nc -N`` therefore needs its tunnel up before it sends EOF."""
    play.dialer.hold()
    conn, t = play.client()
    t.receive(b"CONNECT 203.0.113.9:443 HTTP/1.1\r\n\r\nhello")
    play.settle()
    assert len(play.dialer.calls) == 1
    t.receive_eof()
    assert t.calls == ["close"]
    play.dialer.release()
    play.settle()
    assert play.dialer.upstreams == []  # the dial was cancelled, not completed
    assert play.outcomes() == [("CONNECT", 499, "client_closed", 0, 0)]
    play.assert_all_closed()


def test_no_request_is_processed_after_a_connection_close_answer(play):
    conn, t = play.client()
    t.receive(b"POST http://203.0.113.66/a HTTP/1.1\r\nHost: 203.0.113.66\r\nContent-Length: 2\r\n\r\nhi"
              + get("/b"))        # refused with Connection: close, and a request pipelined behind it
    play.settle()
    assert play.outcomes() == [("POST", 403, "destination_denied", 0, 0)]  # (was + a dialed, then cut GET)


def test_a_tunnel_keeps_no_request_pipeline_alive(play):
    """Once a tunnel takes the connection over, its request pipeline and parser are freed at
    once, by reference counting: they used to stay in reference cycles (the queue held the
    CONNECT's exchange, which held the pipeline; llhttp's parser held ours) until a garbage
    collection, +0.5 KiB per idle tunnel in the benchmark."""
    from egressgate.http1.parse import RequestParser
    from egressgate.proxy.pipeline import RequestPipeline

    def alive(kind) -> int:
        return sum(isinstance(o, kind) for o in gc.get_objects())

    gc.collect()
    gc.disable()
    try:
        pipelines, parsers = alive(RequestPipeline), alive(RequestParser)  # (other tests' leftovers)
        conn, t = play.client()
        assert alive(RequestPipeline) == pipelines + 1 and alive(RequestParser) == parsers + 1
        t.receive(b"CONNECT 203.0.113.9:443 HTTP/1.1\r\n\r\nhello")
        play.settle()
        up, ut = play.upstream()
        assert t.take() == CONNECT_OK and conn.http is None
        assert alive(RequestPipeline) == pipelines and alive(RequestParser) == parsers
    finally:
        gc.enable()


def test_a_connection_with_request_bytes_still_unsent_is_not_pooled():
    """An upstream whose write buffer still holds request bytes is closed, not kept for the next
    request (which would follow bytes the origin has not even read)."""
    from egressgate.egress.upstream import Upstream, UpstreamPool

    class Transport:
        buffered = 0
        closed = False

        def is_closing(self) -> bool:
            return self.closed

        def is_reading(self) -> bool:
            return True

        def get_write_buffer_size(self) -> int:
            return self.buffered

        def close(self) -> None:
            self.closed = True

    pool = UpstreamPool()
    for buffered, kept in ((0, True), (10, False)):
        up = Upstream()
        up.transport = tr = Transport()
        tr.buffered = buffered
        pool.put(up, ("k", buffered), 0.0)
        assert (pool.take(("k", buffered)) is up) == kept and tr.closed != kept


@pytest.mark.parametrize("method", ["GET", "CONNECT"])
def test_a_bug_before_the_upstream_is_handed_over_closes_it(play, monkeypatch, method):
    """A bug between the dial and the hand-over (here: the attested-IP lookup) is a 500 for the
    request, counted, and the fresh upstream connection is closed, not left to nobody."""
    from egressgate.egress.plan import ProfilePool

    def boom(self, plan):
        raise RuntimeError("injected")

    monkeypatch.setattr(ProfilePool, "attested_ip", boom)
    conn, t = play.client()
    t.receive(get("/x") if method == "GET" else b"CONNECT 203.0.113.9:443 HTTP/1.1\r\n\r\n")
    play.settle()
    up, ut = play.upstream()
    assert t.take().startswith(b"HTTP/1.1 500 ")
    assert "abort" in ut.calls
    assert play.bugs == ["serve: RuntimeError('injected')"]
    play.bugs.clear()
    t.receive_eof()
    play.settle()
    play.assert_all_closed()
