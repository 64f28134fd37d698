"""Metric label values come from the configuration or fixed sets (observe/metrics.py): names a
client chose are counted as ``-``, so no input can grow the number of series."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from egressgate.observe.metrics import UNKNOWN, Metrics


def series(m: Metrics) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in generate_latest(m.registry).decode().splitlines()
            if line and not line.startswith("#") and not line.startswith("process_")}


def make() -> Metrics:
    m = Metrics()
    m.set_names(["job"], ["default", "spare"])
    return m


CASES = {
    # (client, profile, method) sent -> (client, profile, method) counted
    "configured": (("job", "spare", "GET"), ("job", "spare", "GET")),
    "unknown profile": (("job", "x" * 5000, "GET"), ("job", UNKNOWN, "GET")),
    "unknown client": (("mallory", "default", "GET"), (UNKNOWN, "default", "GET")),
    "unknown method": (("job", "default", "FROBNICATE"), ("job", "default", "OTHER")),
    "nothing identified": (("-", "-", "-"), (UNKNOWN, UNKNOWN, "OTHER")),
}


@pytest.mark.parametrize("sent, counted", CASES.values(), ids=CASES.keys())
def test_count_request_maps_unknown_names(sent, counted):
    m = make()
    m.count_request(*sent, 403)
    assert m._hot.requests == {(*counted, 403): 1}


def test_a_flood_of_names_adds_no_series():
    m = make()
    m.count_request("job", "bogus-0", "GET", 403)
    m.count_bytes("bogus-0", 1, 1)
    m.would_deny.labels("bogus-0", "destination_not_allowed").inc()
    m.connected("bogus-0", 0.1)
    m.egress_source_up.labels("bogus-0", "direct").set(1)
    before = series(m)
    for i in range(1, 500):
        name = f"bogus-{i}"
        m.count_request(name, name, name, 403)
        m.count_request("job", name, "GET", 403)
        m.count_bytes(name, 1, 1)
        m.would_deny.labels(name, "destination_not_allowed").inc()
        m.connected(name, 0.1)
        m.egress_source_up.labels(name, "direct").set(1)
    after = series(m)
    assert after - before == {'egressgate_requests_total{client="-",method="OTHER",profile="-",status="403"}'}


def test_names_stay_known_after_a_reload_drops_them():
    m = make()
    m.set_names(["other"], ["default"])  # a reload: "job" and "spare" are gone from the config
    m.count_request("job", "spare", "GET", 200)  # a request that started before the reload
    assert m._hot.requests == {("job", "spare", "GET", 200): 1}
