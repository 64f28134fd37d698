"""What a forwarded request tells the origin about the client and the gateway (``forwarding``):
by default no client address reaches a provider (client-sent X-Forwarded-For, Forwarded,
X-Real-IP, ... are removed, none is added) and Via names the hop only as "egressgate";
``x_forwarded_for: keep`` forwards the client's fields as sent, ``via: false`` adds no Via."""

from __future__ import annotations

import json

from .conftest import curl
from .peers import base_config

SENT = [
    ("X-Forwarded-For", "10.8.1.2, 10.0.0.7"),
    ("Forwarded", "for=10.8.1.2;by=10.0.0.7"),
    ("X-Real-IP", "10.8.1.2"),
    ("X-Forwarded-Host", "collector.internal"),
]


def _seen_by_origin(gw, origin) -> tuple[dict[str, str], bytes]:
    """(the request fields the origin received, the response head the client received)."""
    args = []
    for name, value in SENT:
        args += ["-H", f"{name}: {value}"]
    r = curl("-D", "-", "-x", gw.url, *args, origin.url("/headers"))
    assert r.returncode == 0, r.stderr
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    return {k.lower(): v for k, v in json.loads(body)["headers"]}, head.lower()


def test_client_addresses_do_not_reach_the_origin_by_default(start_gateway, origin):
    seen, head = _seen_by_origin(start_gateway(base_config()), origin)
    for name, _ in SENT:
        assert name.lower() not in seen, seen
    assert "10.8.1.2" not in json.dumps(seen) and "127.0.0.1" not in seen.get("via", "")
    assert seen["via"] == "1.1 egressgate"
    assert b"\r\nvia: 1.1 egressgate" in head


def test_client_addresses_kept_when_configured(start_gateway, origin):
    gw = start_gateway(base_config(forwarding={"x_forwarded_for": "keep"}))
    seen, _ = _seen_by_origin(gw, origin)
    for name, value in SENT:
        assert seen[name.lower()] == value, seen
    assert seen["via"] == "1.1 egressgate"


def test_via_can_be_turned_off(start_gateway, origin):
    gw = start_gateway(base_config(forwarding={"via": False}))
    seen, head = _seen_by_origin(gw, origin)
    assert "via" not in seen, seen
    assert b"\r\nvia:" not in head, head
    assert "x-forwarded-for" not in seen  # stripping stays the default
