"""Issue 25 item 3: the admin API refuses the browser, and URLs are shown without secrets.

A web page in an operator's browser reached the admin listener two ways: a cross-site POST
triggered a real reload, and a name rebound to 127.0.0.1 read ``/status``, which showed an
in-flight URL with its query string (an API key). Every request carrying a foreign ``Host`` or
``Origin`` is now refused 403, and targets are shown without query strings or URL credentials
in ``/status``, the status page's denials and (unless ``log.full_targets``) the access log."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request

from .peers import base_config, raw_exchange, wait_for

SECRET = "sk-live-0123456789"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an environment proxy


def _admin(gw, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    host_port = gw.admin.removeprefix("http://")
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += "Content-Length: 0\r\nConnection: close\r\n\r\n"
    answer = raw_exchange(host_port, head.encode(), timeout=10)
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1]


def test_cross_site_post_and_rebound_names_are_refused(start_gateway):
    gw = start_gateway(base_config())
    here = gw.admin.removeprefix("http://")
    # a cross-site form POST (Host is this address: the page targets it directly)
    assert _admin(gw, "POST", "/-/reload", {"Host": here, "Origin": "http://evil.example"})[0] == 403
    assert _admin(gw, "POST", "/-/reload", {"Host": here, "Origin": "null"})[0] == 403
    assert _admin(gw, "POST", "/-/reload", {"Host": here, "Sec-Fetch-Site": "cross-site"})[0] == 403
    # ... and one from a browser that sends no Origin: a form's Content-Type, no token
    for ctype in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "Text/Plain"):
        assert _admin(gw, "POST", "/-/reload", {"Host": here, "Content-Type": ctype})[0] == 403, ctype
    assert not [e for e in gw.events if e.get("event") == "reloaded"]
    # a rebound name reading /status and the page
    for path in ("/status", "/", "/metrics", "/-/reload"):
        assert _admin(gw, "GET", path, {"Host": f"rebind.evil.example:{gw.admin.rsplit(':', 1)[1]}"})[0] == 403
    # tools: an IP, localhost, no Host at all; a same-origin Origin
    for headers in ({"Host": here}, {"Host": "localhost"}, {},
                    {"Host": here, "Origin": f"http://{here}", "Sec-Fetch-Site": "same-origin"}):
        assert _admin(gw, "GET", "/status", headers)[0] == 200, headers
    assert _admin(gw, "POST", "/-/reload", {"Host": here})[0] == 200  # curl -X POST
    assert _admin(gw, "POST", "/-/reload", {"Host": here, "Content-Type": "application/json"})[0] == 200
    gw.wait_event("reloaded")  # (so the check above that none happened could have failed)


def test_allowed_hosts_names_the_admin_may_be_reached_by(start_gateway):
    gw = start_gateway(base_config(admin={"address": "127.0.0.1:0", "allowed_hosts": ["egress-admin.svc"]}))
    assert _admin(gw, "GET", "/status", {"Host": "EGRESS-ADMIN.svc:9128"})[0] == 200
    assert _admin(gw, "GET", "/status", {"Host": "egress-admin.svc.evil.example"})[0] == 403
    text = _admin(gw, "GET", "/metrics", {"Host": "127.0.0.1"})[1].decode()
    assert 'egressgate_admin_connections_closed_total{reason="foreign"} 1.0' in text


def test_status_and_access_log_hide_query_strings_and_credentials(start_gateway, origin):
    gw = start_gateway(base_config(log={"full_targets": False}))  # (the default; the harness sets it)
    url = f"http://127.0.0.1:{origin.port}/slow?delay=3&api_key={SECRET}"
    done = threading.Event()

    def slow_request() -> None:
        try:
            s = socket.create_connection((gw.address.rsplit(":", 1)[0], gw.port), timeout=10)
            s.sendall(f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\nConnection: close\r\n\r\n".encode())
            while s.recv(4096):
                pass
            s.close()
        finally:
            done.set()

    threading.Thread(target=slow_request, daemon=True).start()

    def in_flight() -> list[dict]:
        with OPENER.open(gw.admin + "/status", timeout=5) as resp:
            doc = json.loads(resp.read())
        return [c for c in doc["connections"]["open"] if "/slow" in c.get("target", "")]

    wait_for(lambda: bool(in_flight()), "the slow request shown in /status")
    shown = in_flight()[0]["target"]
    assert SECRET not in shown, shown
    assert shown == f"http://127.0.0.1:{origin.port}/slow?"
    record = gw.wait_log(lambda r: "/slow" in r.get("target", ""), timeout=15)
    assert SECRET not in json.dumps(record), record
    assert record["target"] == f"http://127.0.0.1:{origin.port}/slow?"
    assert done.wait(15)
    # credentials in the URL are refused (400), and the refusal is logged without them
    answer = raw_exchange(gw.address, f"GET http://user:{SECRET}@127.0.0.1:{origin.port}/p HTTP/1.1\r\n"
                          "Host: x\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    record = gw.wait_log(lambda r: r.get("target", "").endswith("/p"))
    assert record["target"] == f"http://127.0.0.1:{origin.port}/p", record


def test_full_targets_keeps_the_query_in_the_access_log_only(start_gateway, origin):
    gw = start_gateway(base_config(log={"full_targets": True}))
    target = f"http://127.0.0.1:{origin.port}/slow?delay=0&api_key={SECRET}"
    answer = raw_exchange(f"{gw.address}", f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert gw.wait_log(lambda r: "/slow" in r.get("target", ""))["target"] == target
