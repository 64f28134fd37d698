"""Password checks under a flood (issue 25 item 1): bounded per source address, on their own
threads (a reload never waits behind them), a waiting check dropped when its client leaves.
Real sockets on loopback; slow scrypt parameters so that checks are in flight together.
The latency figures are measured by bench/auth_flood.py, not asserted here."""

from __future__ import annotations

import base64
import hashlib
import os
import selectors
import signal
import socket

from .peers import base_config, wait_for

SLOW_N = 2**16  # 64 MiB, a few hundred ms a check: many in flight at once


def slow_hash(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SLOW_N, r=8, p=1, dklen=32, maxmem=256 << 20)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"scrypt${SLOW_N}$8$1${b64(salt)}${b64(digest)}"


def _connect_head(password: str) -> bytes:
    creds = base64.b64encode(f"job:{password}".encode()).decode()
    return (f"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n"
            f"Proxy-Authorization: Basic {creds}\r\n\r\n").encode()


def test_password_checks_are_bounded_per_source_and_reloads_do_not_wait(start_gateway):
    """Defect: every wrong password from one address queued a scrypt check without bound in the
    shared default executor (which reloads use too). Now at most 4 checks per source are in
    flight; the rest are answered 429 ``auth_checks_busy`` at once, and a reload sent while they
    run completes before they do."""
    cfg = base_config(clients=[{"name": "job", "username": "job", "password_hash": slow_hash("right")}],
                      reload={"watch": False})
    gw = start_gateway(cfg)
    host, port = gw.address.rsplit(":", 1)
    socks = []
    try:
        for i in range(12):
            s = socket.create_connection((host, int(port)), timeout=60)
            s.sendall(_connect_head(f"wrong-{i}"))
            socks.append(s)
        n = len(gw.events)
        gw.signal(signal.SIGHUP)
        answers = [s.recv(200) for s in socks]
    finally:
        for s in socks:
            s.close()
    busy = [a for a in answers if a.startswith(b"HTTP/1.1 429")]
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 407")]
    assert len(refused) <= 4 and len(busy) >= 8, answers
    assert all(b"Too Many Password Checks" in a for a in busy), busy[:1]
    rec = gw.wait_log(lambda r: r.get("status") == 429)
    assert rec["reason"] == "auth_checks_busy", rec
    gw.wait_event("reloaded", after=n)


def _open(host: str, port: int, source: str, user: str, password: str) -> socket.socket:
    s = socket.create_connection((host, port), timeout=60, source_address=(source, 0))
    creds = base64.b64encode(f"{user}:{password}".encode()).decode()
    s.sendall((f"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n"
               f"Proxy-Authorization: Basic {creds}\r\n\r\n").encode())
    return s


def _answers_in_order(socks: list[socket.socket], until: socket.socket) -> list[socket.socket]:
    """The sockets in the order their first answer arrives, up to and including ``until``."""
    order: list[socket.socket] = []
    with selectors.DefaultSelector() as sel:
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        while until not in order:
            ready = sel.select(timeout=60)
            assert ready, "no answer within 60 s"
            for key, _ in ready:
                order.append(key.fileobj)
                sel.unregister(key.fileobj)
    return order


def test_a_clean_sources_check_never_waits_behind_a_failing_sources(start_gateway):
    """Defect: with both password threads busy on checks from one address sending many new
    passwords at once, a new client's first check waited for one of them to finish (and shared
    the CPU with both). Now a source's one outstanding check is clean and the others (and any
    from a source that failed lately) are suspect: they hold at most one of the two threads, and
    none starts while a clean check waits or runs. Of the four checks the attacker has queued,
    at most the one already running answers before the bystander."""
    cfg = base_config(clients=[
        {"name": "bystander", "username": "by", "from": ["127.0.0.201/32"], "password_hash": slow_hash("right")},
        {"name": "job", "username": "job", "password_hash": slow_hash("right")}])
    gw = start_gateway(cfg)
    host, port = gw.address.rsplit(":", 1)
    port = int(port)
    attacker = "127.0.0.10"  # its first check is clean, the three more it has outstanding are not
    socks = [_open(host, port, attacker, "job", f"wrong-{i}") for i in range(5)]
    try:
        # one of the five is over the per-source bound: then the other four are queued or running
        with selectors.DefaultSelector() as sel:
            for s in socks:
                sel.register(s, selectors.EVENT_READ)
            ready = sel.select(timeout=60)
            assert ready, "no 429 within 60 s"
            busy = ready[0][0].fileobj
        assert busy.recv(200).startswith(b"HTTP/1.1 429"), "the fifth check was not refused"
        queued = [s for s in socks if s is not busy]
        bystander = _open(host, port, "127.0.0.201", "by", "right")
        order = _answers_in_order([*queued, bystander], until=bystander)
        answer = bystander.recv(200)
        assert not answer.startswith((b"HTTP/1.1 407", b"HTTP/1.1 429")), answer
        ahead = [s for s in order if s is not bystander]
        assert len(ahead) <= 1, f"{len(ahead)} of the attacker's checks answered before the bystander's"
        bystander.close()
    finally:
        for s in socks:
            s.close()


def _fill_source(host: str, port: int, source: str) -> list[socket.socket]:
    """Wrong passwords from ``source`` until one is refused 429: then its four checks are queued
    or running (the per-source bound). Returns the four sockets waiting for their verdicts."""
    socks = [_open(host, port, source, "job", f"wrong-{source}-{i}") for i in range(5)]
    with selectors.DefaultSelector() as sel:
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        ready = sel.select(timeout=60)
    assert ready, "no answer within 60 s"
    busy = ready[0][0].fileobj
    answer = busy.recv(200)
    busy.close()
    assert answer.startswith(b"HTTP/1.1 429"), answer
    return [s for s in socks if s is not busy]


def _status(s: socket.socket) -> bytes:
    with s:
        return s.recv(200).split(b"\r\n", 1)[0]


def test_known_credentials_never_wait_behind_unknown_ones_across_a_reload(start_gateway):
    """Defect: the accepted-credentials cache lived in the config generation, so after any
    reload a known client's next login was a new scrypt check, queued behind an attack's (here:
    refused 429 with its source's checks all taken). Now a verdict is keyed by the stored hash
    and the password, and outlives a reload for an entry that kept its hash; an entry whose hash
    changed is checked again."""
    cfg = base_config(clients=[{"name": "job", "username": "job", "password_hash": slow_hash("right")}],
                      reload={"watch": False})
    gw = start_gateway(cfg)
    host, port = gw.address.rsplit(":", 1)
    port = int(port)
    source = "127.0.0.50"
    first = _status(_open(host, port, source, "job", "right"))
    assert not first.startswith((b"HTTP/1.1 407", b"HTTP/1.1 429")), first

    # a reload that changes something else: the entry keeps its hash
    cfg["clients"].append({"name": "other", "username": "other", "password_hash": slow_hash("x")})
    gw.write_config(cfg)
    n = len(gw.events)
    gw.signal(signal.SIGHUP)
    gw.wait_event("reloaded", after=n, timeout=30)
    waiting = _fill_source(host, port, source)
    try:
        again = _status(_open(host, port, source, "job", "right"))
        assert not again.startswith((b"HTTP/1.1 407", b"HTTP/1.1 429")), again  # 429 before: a new check
    finally:
        answers = [_status(s) for s in waiting]
    assert all(a.startswith(b"HTTP/1.1 407") for a in answers), answers

    # the entry's hash changes (to another password): the old password is checked again, and wrong
    cfg["clients"][0]["password_hash"] = slow_hash("changed")
    gw.write_config(cfg)
    n = len(gw.events)
    gw.signal(signal.SIGHUP)
    gw.wait_event("reloaded", after=n, timeout=30)
    assert _status(_open(host, port, source, "job", "right")).startswith(b"HTTP/1.1 407")
    assert not _status(_open(host, port, source, "job", "changed")).startswith((b"HTTP/1.1 407", b"HTTP/1.1 429"))


def test_waiting_and_dropped_checks_are_counted(start_gateway):
    """Issue 25 item 1 (metrics): checks refused over the bound are counted as dropped (busy),
    checks whose clients all left before they ran as dropped (client_gone), and the checks
    waiting for a thread are a gauge, for passwords and tokens alike."""
    from .test_hostile_ops import scrape, value

    cfg = base_config(clients=[{"name": "job", "username": "job", "password_hash": slow_hash("right")}])
    gw = start_gateway(cfg)
    host, port = gw.address.rsplit(":", 1)
    text = scrape(gw)
    for kind in ("password", "token"):
        assert f'egressgate_auth_checks_waiting{{kind="{kind}"}} 0.0' in text
        for reason in ("client_gone", "busy"):
            assert f'egressgate_auth_checks_dropped_total{{kind="{kind}",reason="{reason}"}} 0.0' in text
    waiting = _fill_source(host, int(port), "127.0.0.60")  # four in flight, the fifth refused 429
    text = scrape(gw)
    assert value(text, "egressgate_auth_checks_dropped_total", kind="password", reason="busy") == 1
    # one runs (a source's first check), the others wait: one suspect check at most, and
    # none while a clean one runs
    assert value(text, "egressgate_auth_checks_waiting", kind="password") >= 2
    for s in waiting:
        s.close()
    wait_for(lambda: value(scrape(gw), "egressgate_auth_checks_dropped_total", kind="password",
                           reason="client_gone") >= 1, "a waiting check dropped when its client left", timeout=30)
    wait_for(lambda: value(scrape(gw), "egressgate_auth_checks_waiting", kind="password") == 0,
             "no check waiting", timeout=30)
