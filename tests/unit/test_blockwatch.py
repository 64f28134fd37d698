"""Block-aware egress, the pure half (``egress.blockwatch``): signal classification, the state
machine per (member x provider) over a sliding window, provider ``match:`` patterns, and the
TLS-alert / reset signals read from real loopback servers (a TLS server that refuses the client's
protocol version, a server that resets right after the ClientHello)."""

from __future__ import annotations

import socket
import ssl
import struct
import threading

import pytest

from egressgate.egress.blockwatch import (
    BlockWatch,
    Matcher,
    Thresholds,
    classify_http,
    classify_tunnel,
    header_value,
    retry_after,
    tls_alert,
)

T = Thresholds(window=60, throttle_after=3, suspect_after=3, block_after=5, block_ratio=0.5)


def feed(w: BlockWatch, signal: str, n: int, at: float, member: str = "a", provider: str = "x"):
    out = []
    for i in range(n):
        tr = w.observe(member, provider, signal, at + i * 0.01, evidence=f"{signal}#{i}")
        if tr:
            out.append(tr.after)
    return out


def test_403_burst_moves_suspected_then_blocked_and_only_a_passing_check_restores():
    w = BlockWatch(T)
    assert feed(w, "ok", 5, 0) == []
    assert feed(w, "block_status", 10, 1) == ["suspected", "blocked"]
    assert w.state("a", "x") == "blocked"
    assert feed(w, "ok", 50, 2) == []  # live traffic alone never unblocks
    assert w.state("a", "x") == "blocked"
    tr = w.observe("a", "x", "check_ok", 3)
    assert tr and (tr.before, tr.after) == ("blocked", "reverified")
    assert feed(w, "ok", 1, 4) == ["healthy"]


def test_other_provider_and_member_are_untouched():
    w = BlockWatch(T)
    feed(w, "block_status", 10, 0)
    assert w.state("a", "x") == "blocked"
    assert w.state("a", "y") == "healthy"
    assert w.state("b", "x") == "healthy"
    assert header_value(w.state("a", "y"), "y", "a") == "healthy; provider=y; member=a"


def test_sliding_window_forgets_old_blocks():
    w = BlockWatch(T)
    assert feed(w, "block_status", 3, 0) == ["suspected"]
    assert feed(w, "ok", 1, 100) == ["healthy"]  # the 3 blocks left the 60 s window


def test_ratio_keeps_a_busy_member_from_blocking_on_a_few_403s():
    w = BlockWatch(T)
    feed(w, "ok", 100, 0)
    assert feed(w, "block_status", 6, 2) == ["suspected"]
    assert w.state("a", "x") == "suspected"


def test_throttle_signals_mark_throttled_and_transition_carries_evidence():
    w = BlockWatch(T)
    assert feed(w, "throttle", 3, 0) == ["throttled"]
    w2 = BlockWatch(T)
    trs = [w2.observe("a", "x", "check_throttled", i) for i in range(3)]
    assert trs[-1] is not None and trs[-1].after == "throttled" and trs[-1].evidence == ""


def test_classify_http():
    assert classify_http(403, False, None) == "block_status"
    assert classify_http(451, False, None) == "block_status"
    assert classify_http(429, False, None) == "throttle"
    assert classify_http(503, True, None) == "throttle"
    assert classify_http(503, False, None) == "ok"
    assert classify_http(200, False, "captcha") == "marker"
    assert classify_http(200, False, None) == "ok"


def test_matcher_patterns_and_markers_bounded():
    m = Matcher("x", ("*.vendor-x.com", "api.other.io", "cdn?.x.net"), ("g-recaptcha", "Access Denied"))
    assert m.matches("a.b.vendor-x.com") and m.matches("API.other.io.") and m.matches("cdn1.x.net")
    assert not m.matches("vendor-x.com.evil") and not m.matches("notvendor-x.com")
    assert m.marker_in(b"HTTP/1.1 200 OK\r\n\r\n<div class=g-recaptcha>") == "g-recaptcha"
    assert m.marker_in(b"x" * 20000 + b"access denied") is None  # past the bounded look


def test_retry_after_seconds_and_date_and_garbage():
    assert retry_after("120", 1000.0) == 1120.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 0) == pytest.approx(1445412480.0)
    assert retry_after("soon", 0) is None
    w = BlockWatch(T)
    w.hold("a", "x", 50)
    assert w.held("a", "x", 10) and not w.held("a", "x", 60)


def test_window_is_bounded_per_pair():
    w = BlockWatch(T, cap=100)
    feed(w, "ok", 1000, 0)
    assert len(w.pairs[("a", "x")].events) <= 100


def _client_hello(max_version: ssl.TLSVersion) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = max_version
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="vendor-x.test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def _serve_once(handler) -> tuple[socket.socket, threading.Thread]:
    srv = socket.create_server(("127.0.0.1", 0))
    th = threading.Thread(target=lambda: handler(srv.accept()[0]), daemon=True)
    th.start()
    return srv, th


def _recv_all(sock: socket.socket) -> tuple[bytes, bool]:
    data, reset = b"", False
    sock.settimeout(10)
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        reset = True
    return data, reset


def test_real_tls_server_alert_is_read_before_encryption(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("vendor-x.test")
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(sctx)
    sctx.minimum_version = ssl.TLSVersion.TLSv1_3

    def handler(conn: socket.socket) -> None:
        try:
            sctx.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            conn.close()

    srv, th = _serve_once(handler)
    with srv, socket.create_connection(srv.getsockname()) as c:
        hello = _client_hello(ssl.TLSVersion.TLSv1_2)
        c.sendall(hello)
        data, reset = _recv_all(c)
    th.join(10)
    alert = tls_alert(data)
    assert alert is not None and alert[0] == 2  # fatal (protocol_version or handshake_failure)
    sig = classify_tunnel(bytes_up=len(hello), bytes_down=len(data), reset=reset,
                          closed_after_first_flight=True, alert=alert)
    assert sig == "tls_alert"


def test_real_server_resetting_after_client_hello_is_early_close():
    def handler(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # RST

    srv, th = _serve_once(handler)
    with srv, socket.create_connection(srv.getsockname()) as c:
        hello = _client_hello(ssl.TLSVersion.TLSv1_3)
        c.sendall(hello)
        data, reset = _recv_all(c)
    th.join(10)
    assert reset and data == b""
    assert tls_alert(data) is None
    sig = classify_tunnel(bytes_up=len(hello), bytes_down=0, reset=reset, closed_after_first_flight=True, alert=None)
    assert sig == "early_close"
    w = BlockWatch(T)
    assert feed(w, sig, 5, 0) == ["suspected", "blocked"]


def test_tunnel_with_data_back_is_ok():
    assert classify_tunnel(bytes_up=500, bytes_down=100000, reset=True, closed_after_first_flight=False,
                           alert=None) == "ok"
    assert classify_tunnel(bytes_up=500, bytes_down=10, reset=False, closed_after_first_flight=False,
                           alert=None) == "tiny_tunnel"


# --- the providers[] keys of block-aware egress, compiled -------------------------------------

FILE = "gw.yaml"


def _checked(providers: str):
    import textwrap

    from egressgate.config.loader import check_config_text

    text = "egress:\n  x:\n    bind: [127.0.0.2]\n" + textwrap.indent(textwrap.dedent(providers), "    ")
    return check_config_text(text, FILE)


@pytest.mark.parametrize(("providers", "expected"), [
    ("providers: [{name: v, url: 'http://v.test/', match: ['bad:port:x']}]",
     f"{FILE}:4: egress.x.providers[0].match: bad destination pattern 'bad:port:x': invalid host name 'bad:port:x'"),
    ("providers: [{name: v, url: 'http://v.test/', match: [v.test], markers: {body: ['(x']}}]",
     f"{FILE}:4: egress.x.providers[0].markers.body: not a regular expression: '(x': missing ), unterminated "
     "subpattern at position 0"),
    ("providers: [{name: v, url: 'http://v.test/', match: [v.test], markers: {header: ['no colon']}}]",
     f"{FILE}:4: egress.x.providers[0].markers.header: expected 'Name: regex', got 'no colon'"),
    ("providers: [{name: v, url: 'http://v.test/', match: [v.test], markers: {status: [99]}}]",
     f"{FILE}:4: egress.x.providers[0].markers.status: not HTTP statuses (100-599): [99]"),
    ("providers: [{name: v, url: 'http://v.test/', match: [v.test], thresholds: {block_after: 1, suspect_after: 3}}]",
     f"{FILE}:4: egress.x.providers[0].thresholds: block_after must be at least suspect_after"),
    ("providers: [{name: v, url: 'http://v.test/', match: [v.test], on_block: sometimes}]",
     f"{FILE}:4: egress.x.providers[0].on_block: write 'report' or 'reroute', not text 'sometimes'"),
    ("providers: [{name: v, url: 'http://v.test/', on_block: reroute}]",
     f"{FILE}:4: egress.x.providers[0]: on_block: reroute needs match: the destinations that are this provider's"),
])
def test_block_keys_refused_with_file_line_key(providers, expected):
    assert _checked(providers).errors == [expected]


def test_compiled_rules_find_the_provider_of_a_destination_and_none_without_match():
    from egressgate.egress.blockwatch import compile_rules
    from egressgate.model import HostPort

    none = _checked("providers: [{name: v, url: 'http://v.test/'}]")
    assert none.errors == [] and compile_rules(none.config.egress) is None  # unconfigured: nothing to pay
    c = _checked("""\
        providers:
          - {name: v, url: 'http://v.test/', match: ['*.vendor-x.com', 'api.vendor-x.io:8443', '198.51.100.0/24'],
             markers: {status: [403, 418], body: [captcha], header: ['Server: ^cloud.*wall']},
             thresholds: {window: 2m, block_after: 5}, on_block: reroute}
          - {name: w, url: 'http://w.test/', match: [w.test]}
        """)
    assert c.errors == []
    rules = compile_rules(c.config.egress)
    v = rules.lookup("x", HostPort("www.vendor-x.com", 443))
    assert v is not None and v.name == "v" and v.reroute and v.thresholds.window == 120 and v.thresholds.block_after == 5
    assert rules.lookup("x", HostPort("vendor-x.com", 443)) is None  # *.domain: subdomains only, as in allow
    assert rules.lookup("x", HostPort("api.vendor-x.io", 8443)) is v
    assert rules.lookup("x", HostPort("api.vendor-x.io", 443)) is None
    assert rules.lookup("x", HostPort("198.51.100.7", 443)) is v
    assert rules.lookup("x", HostPort("w.test", 80)).name == "w"
    assert rules.lookup("other", HostPort("w.test", 80)) is None
    assert v.classify(418, False, None) == "block_status" and v.classify(401, False, None) == "ok"
    assert v.header_marker([(b"Server", b"cloudwall/2")]) == "header Server: cloudwall/2"
    assert v.header_marker([(b"Server", b"nginx")]) is None
    assert v.body_marker(b"x" * 10 + b"<div class=CAPTCHA>") is not None
    assert v.body_marker(b"x" * 1024 + b"captcha") is None  # the first KiB only
