"""Block-aware egress (issue 30) against real loopback providers that turn against ONE source
address mid-run (127.0.0.2; 127.0.0.3 stays welcome), each kind of block on its own:

- a 403 page: the state moves healthy -> suspected -> blocked (events, metric, header, whoami),
  ``on_block: reroute`` moves that provider's new connections to 127.0.0.3 while a second
  provider keeps using 127.0.0.2, and an active check that passes again re-verifies it;
- a 200 page carrying a configured body marker (a CAPTCHA wall): blocked from the body alone,
  and with no other member to go to, 503 with Proxy-Status naming provider, member, evidence;
- a TLS server that resets the connection right after the ClientHello: early closes move the
  state, the CONNECT 200 says so;

and ``egressgate evidence`` on the access log and events those runs produced.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import struct
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
import trustme

from .peers import ClosedPort, HTTPPeer, QuietHandler, ReservedPort, base_config, request_tunnel, wait_for

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
FAST = {"window": "60s", "throttle_after": 3, "suspect_after": 2, "block_after": 4, "block_ratio": 0.5}


class Turncoat(HTTPPeer):
    """A plain-HTTP provider: 200 for everyone until ``block(addr)``; then that source gets a
    403 page (``kind="403"``) or a 200 CAPTCHA page (``kind="marker"``). Records the source
    address of every request, and ``/health`` (the active check) answers the same way."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.blocked: set[str] = set()
        self.seen: list[str] = []
        owner = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                src = self.client_address[0]
                owner.seen.append(src)
                extra = {}
                if src in owner.blocked and owner.kind == "403":
                    status, body = 403, b"<html>Access denied: your IP is banned</html>"
                elif src in owner.blocked and owner.kind == "429":
                    status, body, extra = 429, b"slow down", {"Retry-After": "30"}
                elif src in owner.blocked:
                    status, body = 200, b"<html><title>Just a moment</title><div id=captcha-wall></div></html>"
                else:
                    status, body = 200, b'{"data": "the real thing"}' + b" " * 2000
                self.send_response(status)
                self.send_header("Egress-Block-State", "healthy; provider=spoofed")  # never reaches a job
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(Handler)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class ResettingTls:
    """A TLS provider: a real handshake and a tiny HTTP answer for everyone until ``block``;
    then, for that source, it reads the ClientHello and resets the connection (RST), or
    (``alert=True``) answers it with a fatal handshake_failure alert record and closes."""

    def __init__(self, ca: trustme.CA, alert: bool = False) -> None:
        self.alert = alert
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("localhost", "127.0.0.1").configure_cert(self.ctx)
        self.blocked: set[str] = set()
        self.seen: list[str] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closed:
            try:
                conn, (src, _) = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn, src), daemon=True).start()

    def _one(self, conn: socket.socket, src: str) -> None:
        self.seen.append(src)
        conn.settimeout(10)
        try:
            if src in self.blocked:
                conn.recv(4096)  # the ClientHello
                if self.alert:
                    conn.sendall(b"\x15\x03\x03\x00\x02\x02\x28")  # TLS alert: fatal, handshake_failure
                    conn.close()
                    return
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()  # RST
                return
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(4096)
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok" + b" " * 0)
        except OSError:
            conn.close()

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def _get(url: str, timeout: float = 10) -> tuple[int, dict, bytes]:
    try:
        with OPENER.open(url, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _via(gw, url: str) -> tuple[int, dict, bytes]:
    """A plain-HTTP request through the gateway (urllib as a job would send it)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": gw.url}))
    try:
        with opener.open(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _status_blocks(gw, profile: str) -> dict:
    doc = json.loads(_get(gw.admin + "/status")[2])
    return {(row["member"], row["provider"]): row for row in doc["profiles"][profile]["blocks"] or ()}


def _checked(gw, provider: str, members: list[str]) -> None:
    """Wait for the start-up check of ``provider`` through each member (before a test turns the
    provider against a member: a check that passed later would re-verify it)."""
    wait_for(lambda: all(_status_blocks(gw, "vendor")[(m, provider)]["signals"].get("check_ok") for m in members),
             f"the first checks of {provider}")


def _metrics(gw) -> str:
    return _get(gw.admin + "/metrics")[2].decode()


def _profile(members: list[str], providers: list[dict]) -> dict:
    return {"bind": members, "pick": "failover", "providers": providers}


def _provider(name: str, p, **extra) -> dict:
    return {"name": name, "url": p.url("/health") if hasattr(p, "url") else p, "method": "GET",
            "accept": [200], "interval": "1h", "match": [f"127.0.0.1:{p.port}"], "thresholds": FAST, **extra}


def _job(*ports: int) -> list[dict]:
    return [{"name": "job", "from": ["127.0.0.0/8"], "egress": ["vendor"],
             "allow": [f"127.0.0.1:{p}" for p in ports] + [f"localhost:{p}" for p in ports]}]


@pytest.fixture
def x403():
    p = Turncoat("403")
    yield p
    p.close()


@pytest.fixture
def other():
    p = Turncoat("403")
    yield p
    p.close()


def test_403_page_moves_the_state_tells_the_job_reroutes_that_provider_only_and_a_check_restores(
        start_gateway, x403, other, tmp_path):
    log = tmp_path / "access.log"
    cfg = base_config(egress={"vendor": _profile(["127.0.0.2", "127.0.0.3"], [
        _provider("vendor-x", x403, on_block="reroute"),
        _provider("vendor-y", other)])}, clients=_job(x403.port, other.port))
    cfg["log"] = {**cfg["log"], "access": str(log)}
    gw = start_gateway(cfg)
    _checked(gw, "vendor-x", ["127.0.0.2", "127.0.0.3"])  # the start-up checks pass: everyone is welcome yet
    for _ in range(3):  # healthy: no header at all
        status, headers, body = _via(gw, x403.url("/data"))
        assert status == 200 and "Egress-Block-State" not in headers, headers
    assert set(x403.seen[-3:]) == {"127.0.0.2"}  # failover: the first member carries it
    x403.blocked.add("127.0.0.2")  # mid-run, the provider turns against ONE source address
    status, headers, _ = _via(gw, x403.url("/data?n=1"))
    assert status == 403 and "Egress-Block-State" not in headers  # one 403 is no evidence yet
    status, headers, _ = _via(gw, x403.url("/data?n=2"))
    assert status == 403
    assert headers["Egress-Block-State"] == "suspected; provider=vendor-x; member=127.0.0.2", headers
    for n in (3, 4):
        status, headers, _ = _via(gw, x403.url(f"/data?n={n}"))
    assert status == 403 and headers["Egress-Block-State"].startswith("blocked; provider=vendor-x; member=127.0.0.2")
    changes = wait_for(lambda: (lambda found: found if len(found) >= 2 else None)(
        [e for e in gw.events if e.get("event") == "egress_block_state"]), "both state-change events")
    assert [(e["before"], e["after"]) for e in changes] == [("healthy", "suspected"), ("suspected", "blocked")]
    assert changes[-1]["member"] == "127.0.0.2" and changes[-1]["provider"] == "vendor-x"
    assert "HTTP 403" in changes[-1]["evidence"]
    metrics = _metrics(gw)
    assert ('egressgate_egress_block_state{member="127.0.0.2",profile="vendor",provider="vendor-x",'
            'state="blocked"} 1.0') in metrics
    assert ('egressgate_egress_block_state{member="127.0.0.3",profile="vendor",provider="vendor-x",'
            'state="healthy"} 1.0') in metrics
    who = json.loads(_via(gw, "http://egressgate.whoami/")[2])
    assert [(b["member"], b["provider"], b["state"]) for b in who["egress_blocks"]] == \
        [("127.0.0.2", "vendor-x", "blocked")]
    # reroute: vendor-x's new connections leave from 127.0.0.3 (the provider answers 200 again) ...
    status, headers, _ = _via(gw, x403.url("/data?n=5"))
    assert status == 200 and x403.seen[-1] == "127.0.0.3"
    assert headers["Egress-Block-State"] == "healthy; provider=vendor-x; member=127.0.0.3; rerouted_from=127.0.0.2"
    # ... while vendor-y keeps using the member vendor-x blocks, with no header
    status, headers, _ = _via(gw, other.url("/data"))
    assert status == 200 and other.seen[-1] == "127.0.0.2" and "Egress-Block-State" not in headers
    # live traffic alone never unblocks; the provider lifts the block, an active check passes again
    x403.blocked.clear()
    assert _status_blocks(gw, "vendor")[("127.0.0.2", "vendor-x")]["state"] == "blocked"
    with OPENER.open(urllib.request.Request(gw.admin + "/-/reload", method="POST"), timeout=30) as r:
        assert r.status == 200  # (a reload checks every member x provider at once)
    wait_for(lambda: _status_blocks(gw, "vendor")[("127.0.0.2", "vendor-x")]["state"] == "reverified",
             "the passing check re-verifies 127.0.0.2")
    # (the event is on stderr, read by another thread: it may come a moment after /status says so)
    wait_for(lambda: [e["after"] for e in gw.events if e.get("event") == "egress_block_state"][-1] == "reverified",
             "the reverified event")
    status, headers, _ = _via(gw, x403.url("/data?n=6"))  # back on the first member
    assert status == 200 and x403.seen[-1] == "127.0.0.2"
    status, headers, _ = _via(gw, x403.url("/data?n=7"))
    assert "Egress-Block-State" not in headers
    assert _status_blocks(gw, "vendor")[("127.0.0.2", "vendor-x")]["state"] == "healthy"
    # the access records of vendor-x's traffic say which member, signal and state
    recs = wait_for(lambda: [r for r in _records(log) if r.get("provider") == "vendor-x" and "n=4" in r["target"]],
                    "the record of the 4th 403")
    assert recs[0]["member"] == "127.0.0.2" and recs[0]["signal"] == "block_status"
    assert recs[0]["block_state"] == "blocked" and recs[0]["evidence"].startswith("HTTP 403")
    # the evidence command over that log and the events
    wait_for(lambda: [e for e in gw.events if e.get("event") == "egress_block_state" and e["after"] == "healthy"],
             "the healthy event")
    events = tmp_path / "events.log"
    events.write_text("".join(gw.stderr_lines))
    r = _evidence("--log", str(log), "--events", str(events), "--profile", "vendor", "--provider", "vendor-x",
                  "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    m2 = doc["members"]["127.0.0.2"]
    assert m2["signals"]["block_status"] == 4 and m2["signals"]["ok"] >= 4
    assert [s["status"] for s in m2["samples"]][:4] == [403, 403, 403, 403]
    assert all("n=" not in s["target"] for s in m2["samples"])  # no query strings (they may carry keys)
    assert [c["after"] for c in m2["state_changes"]] == ["suspected", "blocked", "reverified", "healthy"]
    assert any(c["outcome"] == "accepted" for c in m2["checks"])
    assert doc["window"]["from"] <= doc["window"]["to"]
    text = _evidence("--log", str(log), "--events", str(events), "--profile", "vendor", "--provider", "vendor-x")
    assert text.returncode == 0 and "127.0.0.2" in text.stdout and "403" in text.stdout, text.stdout


def _records(path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (FileNotFoundError, ValueError):
        return []


def _evidence(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "egressgate", "evidence", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def captcha():
    p = Turncoat("marker")
    yield p
    p.close()


def test_200_captcha_page_with_a_body_marker_blocks_and_with_nowhere_to_go_503(start_gateway, captcha, tmp_path):
    cfg = base_config(egress={"vendor": _profile(["127.0.0.2"], [
        _provider("vendor-x", captcha, on_block="reroute", markers={"body": ["captcha-wall"]})])},
        clients=_job(captcha.port))
    gw = start_gateway(cfg)
    _checked(gw, "vendor-x", ["127.0.0.2"])
    status, headers, body = _via(gw, captcha.url("/data"))
    assert status == 200 and b"the real thing" in body and "Egress-Block-State" not in headers
    captcha.blocked.add("127.0.0.2")
    seen = []
    for n in range(4):
        status, headers, body = _via(gw, captcha.url(f"/data?n={n}"))
        assert status == 200 and b"captcha-wall" in body  # the page itself reaches the job intact
        seen.append(headers.get("Egress-Block-State", "").split(";")[0])
    # the header tells the state as the answer's head leaves; a body marker is counted at the body's end
    assert seen == ["", "", "suspected", "suspected"], seen
    change = wait_for(lambda: [e for e in gw.events if e.get("event") == "egress_block_state"
                               and e["after"] == "blocked"], "blocked")[0]
    assert change["after"] == "blocked" and "captcha-wall" in change["evidence"]
    # the only member is blocked for vendor-x and it reroutes: nowhere to go
    status, headers, body = _via(gw, captcha.url("/data?n=9"))
    assert status == 503
    proxy_status = headers["Proxy-Status"]
    assert "error=destination_unavailable" in proxy_status
    assert "vendor-x" in proxy_status and "127.0.0.2" in proxy_status and "captcha-wall" in proxy_status
    assert headers["Egress-Block-State"] == "blocked; provider=vendor-x; member=127.0.0.2"
    assert len(captcha.seen) == 5 + 1  # (the start-up check) and nothing left for the refused request
    rec = gw.wait_log(lambda r: "n=9" in r["target"])
    assert rec["status"] == 503 and rec["reason"] == "egress_blocked"
    # the status page: the blocked row, red, with its evidence
    from .test_status_page import parse_dom, render

    rows = {(r[1].text, r[2].text): r for r in parse_dom(render(gw.admin + "/", tmp_path)).tables["blocks"]}
    row = rows[("127.0.0.2", "vendor-x")]
    assert row[3].text == "blocked" and row[3].cls == "bad" and "marker 4" in row[4].text, [c.text for c in row]
    assert "captcha-wall" in row[5].text and row[6].text == "reroute"


@pytest.fixture
def tls_provider(ca):
    p = ResettingTls(ca)
    yield p
    p.close()


def _tunnel(gw, port: int, ca: trustme.CA) -> tuple[bytes, str]:
    """CONNECT localhost:PORT through the gateway, then a TLS handshake and a request inside:
    (the CONNECT reply head, "ok" or the error the handshake met)."""
    s, head = request_tunnel(gw, f"localhost:{port}")
    with s:
        if not head.startswith(b"HTTP/1.1 200"):
            return head, "refused"
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        try:
            with ctx.wrap_socket(s, server_hostname="localhost") as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                return head, "ok" if tls.recv(100).startswith(b"HTTP/1.1 200") else "bad"
        except (OSError, ssl.SSLError) as exc:
            return head, type(exc).__name__


def test_tls_reset_after_the_client_hello_moves_the_state_and_the_connect_200_says_so(
        start_gateway, tls_provider, ca, ca_file):
    cfg = base_config(egress={"vendor": _profile(["127.0.0.2", "127.0.0.3"], [
        {"name": "vendor-t", "url": f"https://localhost:{tls_provider.port}/", "accept": "tls", "interval": "1h",
         "match": [f"localhost:{tls_provider.port}"], "thresholds": FAST}])},
        clients=_job(tls_provider.port))
    gw = start_gateway(cfg, env={"SSL_CERT_FILE": ca_file})  # the checks trust the test's CA
    _checked(gw, "vendor-t", ["127.0.0.2", "127.0.0.3"])
    head, how = _tunnel(gw, tls_provider.port, ca)
    assert how == "ok" and b"Egress-Block-State" not in head
    tls_provider.blocked.add("127.0.0.2")
    heads = []
    for _ in range(4):
        head, how = _tunnel(gw, tls_provider.port, ca)
        assert how != "ok"  # the handshake is reset
        heads.append(head)
    assert b"Egress-Block-State" not in heads[0]
    assert b"Egress-Block-State: suspected; provider=vendor-t; member=127.0.0.2\r\n" in heads[2], heads
    change = wait_for(lambda: [e for e in gw.events if e.get("event") == "egress_block_state"
                               and e["after"] == "blocked"], "blocked")[0]
    assert change["signal"] == "early_close" and "reset by the server" in change["evidence"], change
    rec = gw.wait_log(lambda r: r.get("signal") == "early_close")
    assert rec["member"] == "127.0.0.2" and rec["first_bytes"] == "none" and rec["bytes_down"] == 0
    head, how = _tunnel(gw, tls_provider.port, ca)  # report only (the default): still the same member
    assert b"Egress-Block-State: blocked; provider=vendor-t; member=127.0.0.2\r\n" in head
    assert tls_provider.seen[-1] == "127.0.0.2"
    # a member with no trouble (127.0.0.3) never appears unhealthy
    assert 'member="127.0.0.3",profile="vendor",provider="vendor-t",state="healthy"} 1.0' in _metrics(gw)


@pytest.fixture
def alerting_tls(ca):
    p = ResettingTls(ca, alert=True)
    yield p
    p.close()


def test_tls_alert_before_encryption_is_its_own_signal_and_the_evidence_lists_it(
        start_gateway, alerting_tls, ca, ca_file, tmp_path):
    log = tmp_path / "access.log"
    cfg = base_config(egress={"vendor": _profile(["127.0.0.2", "127.0.0.3"], [
        {"name": "vendor-t", "url": f"https://localhost:{alerting_tls.port}/", "accept": "tls", "interval": "1h",
         "match": [f"localhost:{alerting_tls.port}"], "thresholds": FAST}])},
        clients=_job(alerting_tls.port))
    cfg["log"] = {**cfg["log"], "access": str(log)}
    gw = start_gateway(cfg, env={"SSL_CERT_FILE": ca_file})
    _checked(gw, "vendor-t", ["127.0.0.2", "127.0.0.3"])
    alerting_tls.blocked.add("127.0.0.2")
    for _ in range(2):
        head, how = _tunnel(gw, alerting_tls.port, ca)
        assert how != "ok"
    rec = wait_for(lambda: [r for r in _records(log) if r.get("signal") == "tls_alert"], "a tls_alert record")[0]
    assert rec["first_bytes"] == "tls_alert" and rec["member"] == "127.0.0.2"
    assert rec["evidence"].startswith("TLS alert fatal handshake_failure (40)"), rec
    wait_for(lambda: _status_blocks(gw, "vendor")[("127.0.0.2", "vendor-t")]["state"] == "suspected", "suspected")
    r = _evidence("--log", str(log), "--profile", "vendor", "--provider", "vendor-t", "--json")
    doc = json.loads(r.stdout)
    alerts = doc["members"]["127.0.0.2"]["tls_alerts"]
    assert len(alerts) == 2 and all("handshake_failure" in a["evidence"] and a["ts"] for a in alerts)
    assert "127.0.0.3" not in doc["members"]  # it carried none of vendor-t's traffic


def test_connect_refusals_count_against_the_member(start_gateway):
    with ClosedPort() as closed:
        cfg = base_config(egress={"vendor": _profile(["127.0.0.2", "127.0.0.3"], [
            {"name": "vendor-c", "url": f"http://{closed.address}/", "interval": "1h",
             "match": [closed.address], "thresholds": FAST}])}, clients=_job(closed.port))
        gw = start_gateway(cfg)
        for n in range(2):
            status, _, _ = _via(gw, f"http://{closed.address}/x?n={n}")
            assert status == 502
        rec = gw.wait_log(lambda r: r.get("signal") == "connect_fail")
        assert rec["member"] == "127.0.0.2" and rec["evidence"].startswith("connection_refused to")
        # (the start-up checks were refused too: check_fail)
        row = wait_for(lambda: (r := _status_blocks(gw, "vendor")[("127.0.0.2", "vendor-c")])["signals"]
                       .get("connect_fail") == 2 and r, "two connect_fail signals")
        assert row["state"] == "suspected" and row["signals"]["check_fail"] == 1, row


@pytest.fixture
def throttler():
    p = Turncoat("429")
    yield p
    p.close()


def test_429_with_retry_after_throttles_and_the_header_carries_the_wait(start_gateway, throttler):
    cfg = base_config(egress={"vendor": _profile(["127.0.0.2", "127.0.0.3"], [
        _provider("vendor-x", throttler, on_block="reroute")])}, clients=_job(throttler.port))
    gw = start_gateway(cfg)
    _checked(gw, "vendor-x", ["127.0.0.2", "127.0.0.3"])
    throttler.blocked.add("127.0.0.2")
    got = []
    for n in range(3):
        status, headers, _ = _via(gw, throttler.url(f"/data?n={n}"))
        assert status == 429 and headers["Retry-After"] == "30"  # the provider's answer reaches the job
        got.append(headers.get("Egress-Block-State"))
    assert got[:2] == [None, None]
    assert re.fullmatch(r"throttled; provider=vendor-x; member=127\.0\.0\.2; retry_after=(30|31)", got[2]), got
    row = _status_blocks(gw, "vendor")[("127.0.0.2", "vendor-x")]
    assert row["state"] == "throttled" and row["signals"]["throttle"] == 3 and 28 <= row["held_for"] <= 30
    # throttling is no block: reroute leaves the member in use
    _via(gw, throttler.url("/data?n=9"))
    assert throttler.seen[-1] == "127.0.0.2"


def _blocked_workers(gw, member: str) -> float:
    """How many workers see ``member`` blocked for vendor-x (the merged metric sums them)."""
    want = f'egressgate_egress_block_state{{member="{member}",profile="vendor",provider="vendor-x",state="blocked"}} '
    return next((float(ln.rsplit(" ", 1)[1]) for ln in _metrics(gw).splitlines() if ln.startswith(want)), 0.0)


def test_workers_share_a_blocked_state_so_every_worker_reroutes(start_gateway, x403):
    cfg = base_config(egress={"vendor": _profile(["127.0.0.2", "127.0.0.3"], [
        _provider("vendor-x", x403, on_block="reroute")])}, clients=_job(x403.port), workers=2)
    with ReservedPort() as port:  # workers need a fixed port: held until they listen on it
        cfg["listen"] = [{"address": port.address}]
        gw = start_gateway(cfg)
        wait_for(lambda: len([e for e in gw.events if e.get("event") == "started"]) >= 2, "both workers")
    x403.blocked.add("127.0.0.2")
    for n in range(40):  # each connection lands on either worker; stop at the first that sees blocked
        status, headers, _ = _via(gw, x403.url(f"/data?n={n}"))
        if headers.get("Egress-Block-State", "").startswith("blocked"):
            break
    else:
        raise AssertionError("no worker ever saw 127.0.0.2 blocked")
    # the other worker has seen at most 3 of the 403s (block_after is 4): it is blocked only
    # because the one that saw 4 told it (through worker 0)
    wait_for(lambda: _blocked_workers(gw, "127.0.0.2") == 2, "both workers see 127.0.0.2 blocked")
    for n in range(8):  # every worker reroutes vendor-x's new connections
        status, _, _ = _via(gw, x403.url(f"/after?n={n}"))
        assert status == 200 and x403.seen[-1] == "127.0.0.3"


def test_instances_share_a_blocked_state_through_the_fleet_store(start_gateway, x403, tmp_path):
    """With fleet.redis, a member one instance finds blocked is blocked on the other instance
    too (pub/sub, well within a second of the finding): the other instance, which has seen none
    of the 403s, reroutes that provider's new connections at once."""
    from .redisserver import RedisServer

    redis = RedisServer(tmp_path)
    try:
        gws = []
        for _ in range(2):
            cfg = base_config(egress={"vendor": _profile(["127.0.0.2", "127.0.0.3"], [
                _provider("vendor-x", x403, on_block="reroute")])}, clients=_job(x403.port),
                fleet={"redis": {"url": redis.url, "timeout": "250ms"}})
            gws.append(start_gateway(cfg))
        a, b = gws
        wait_for(lambda: all(any(e.get("event") == "started" for e in g.events) for g in gws), "both instances")
        x403.blocked.add("127.0.0.2")
        for n in range(40):  # instance a alone sees the 403s
            _, headers, _ = _via(a, x403.url(f"/data?n={n}"))
            if headers.get("Egress-Block-State", "").startswith("blocked"):
                break
        else:
            raise AssertionError("instance a never saw 127.0.0.2 blocked")
        seen_by_b = len(x403.seen)
        wait_for(lambda: _blocked_workers(b, "127.0.0.2") == 1, "instance b sees 127.0.0.2 blocked", timeout=5)
        status, headers, _ = _via(b, x403.url("/from-b"))
        assert status == 200 and x403.seen[-1] == "127.0.0.3", x403.seen[seen_by_b:]
        assert "rerouted_from=127.0.0.2" in headers.get("Egress-Block-State", ""), headers
    finally:
        redis.kill()
