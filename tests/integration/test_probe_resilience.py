"""A shared outside condition (the IP-echo services) must not take every instance out at once:
several echo sources (probe.echo_url as a list, tried in order), and the last good attestation
held for probe.grace when no echo service answers - never when one answers with a wrong IP.
Loopback echo servers that go down; the real gateway's /readyz."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.integration.peers import ClosedPort, base_config, wait_for


class Echo:
    """An IP-echo service whose answer the test sets (None: the caller's address)."""

    def __init__(self) -> None:
        echo = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                body = (echo.answer or self.client_address[0]).encode()
                echo.hits += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.answer: str | None = None
        self.hits = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/ip"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.up = True

    def down(self) -> None:
        """Stop answering: the port is closed (connections refused)."""
        if self.up:
            self.server.shutdown()
            self.server.server_close()
            self.up = False


@pytest.fixture
def echo():
    e = Echo()
    yield e
    e.down()


def _ready(gw) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # not the environment's proxy
    try:
        with opener.open(gw.admin + "/readyz", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _config(echo_url, **probe):
    return base_config(egress={"x": {"bind": ["127.0.0.2"], "expect_ip": ["127.0.0.2"]}},
                       listen=[{"address": "127.0.0.1:0", "egress": "x"}],
                       probe={"echo_url": echo_url, "interval": "0.3s", "retry": "0.2s", **probe})


def _failed_checks(gw) -> int:
    return sum(1 for e in gw.events if e.get("event") == "egress_ip_check_failed")


def test_a_second_echo_source_verifies_when_the_first_is_down(start_gateway, echo):
    with ClosedPort() as dead:
        gw = start_gateway(_config([f"http://{dead.address}/ip", echo.url], grace=0))
        wait_for(lambda: _ready(gw)[0] == 200, "ready through the second echo service")
        assert echo.hits >= 1
        assert _failed_checks(gw) == 0


def test_an_echo_outage_within_grace_keeps_the_instance_ready(start_gateway, echo):
    gw = start_gateway(_config([echo.url], grace="1h"))
    wait_for(lambda: _ready(gw)[0] == 200, "ready")
    echo.down()
    before = _failed_checks(gw)
    wait_for(lambda: _failed_checks(gw) >= before + 3, "three failed checks while the echo service is down")
    status, body = _ready(gw)
    assert status == 200, body


def test_without_grace_the_same_outage_makes_it_unready(start_gateway, echo):
    """The contrast: probe.grace: 0 is the old behaviour (and what a fleet-wide restart came from)."""
    gw = start_gateway(_config([echo.url], grace=0))
    wait_for(lambda: _ready(gw)[0] == 200, "ready")
    echo.down()
    wait_for(lambda: _ready(gw)[0] == 503, "unready once the echo service is down")
    assert b"egress_ip_unverified" in _ready(gw)[1] or b"not verified" in _ready(gw)[1]


def test_a_wrong_ip_is_never_held(start_gateway, echo):
    gw = start_gateway(_config([echo.url], grace="1h"))
    wait_for(lambda: _ready(gw)[0] == 200, "ready")
    echo.answer = "203.0.113.5"
    wait_for(lambda: _ready(gw)[0] == 503, "unready at once on a wrong egress IP, grace or not")
    assert b"203.0.113.5" in _ready(gw)[1]


def test_grace_ends(start_gateway, echo):
    gw = start_gateway(_config([echo.url], grace="1s"))
    wait_for(lambda: _ready(gw)[0] == 200, "ready")
    echo.down()
    wait_for(lambda: _ready(gw)[0] == 503, "unready once probe.grace has passed")
