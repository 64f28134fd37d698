"""One instance, several workers, one truth (issue 28, item 1): shared-IP limits and holds are
exact across the worker processes sharing the listener -- the provider (a counting loopback
origin) never sees more than ``max_concurrent`` at once, one token bucket serves every
worker, a hold one worker learns refuses on all of them, and ``/status`` counts every
worker's open connections."""

from __future__ import annotations

import json
import urllib.request

import pytest

from .counting import CountingOrigin
from .peers import ReservedPort, base_config, burst, get_status, join_all, wait_for

WORKERS = 2
N = 24  # requests sent at once, each on its own connection (spread over the workers by the kernel)


@pytest.fixture
def origin():
    o = CountingOrigin()
    yield o
    o.close()


def _config(port: str, protect: list[dict], **extra) -> dict:
    return base_config(listen=[{"address": port}], workers=WORKERS,
                       egress={"default": {"direct": {}, "protect": protect}}, **extra)


def _start(start_gateway, protect: list[dict]):
    with ReservedPort() as port:  # workers need a fixed port: held until they listen on it
        gw = start_gateway(_config(port.address, protect))
        wait_for(lambda: len([e for e in gw.events if e.get("event") == "started"]) >= WORKERS, "every worker started")
    return gw


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _status(gw) -> dict:
    with _opener.open(gw.admin + "/status", timeout=10) as r:
        return json.loads(r.read())


def _served_by_both(gw) -> bool:
    return {e.get("worker") for e in gw.events if e.get("event") == "started"} == set(range(WORKERS))


def test_max_concurrent_is_never_exceeded_across_workers(start_gateway, origin):
    """max_concurrent 3 with two workers: of N requests sent at once, the origin sees at most
    3 at a time (per process it would have been up to 3 each); the rest are refused 429.
    Once released, their slots serve the next burst, from whichever worker. /status counts
    the open connections of both workers."""
    gw = _start(start_gateway, [{"name": "p", "destinations": ["127.0.0.1"], "max_concurrent": 3}])
    assert _served_by_both(gw)
    for round_ in range(2):
        origin.release.clear()
        statuses, threads = burst([gw], origin.url("/hold"), N)
        wait_for(lambda s=statuses: len(s) + origin.in_flight >= N, "every request admitted or refused", timeout=20)
        assert origin.in_flight == 3 and origin.most == 3, (origin.in_flight, origin.most, statuses)
        assert statuses.count(429) == N - 3
        if round_ == 0:
            doc = _status(gw)
            assert doc["connections"]["total"] >= 3, doc["connections"]
            assert {c.get("worker") for c in doc["connections"]["open"]} <= set(range(WORKERS))
            members = doc["profiles"]["default"]["protect"]["rules"][0]["members"]
            assert sum(m["in_flight"] for m in members.values()) == 3, members
        origin.release.set()
        join_all(threads)
        assert statuses.count(200) == 3 and len(statuses) == N
        wait_for(lambda: origin.in_flight == 0, "the origin idle")


def test_one_rate_bucket_for_every_worker(start_gateway, origin):
    """max_per_second 0.01 (one token): of N requests sent at once to two workers, exactly one
    reaches the origin (per process, each worker had a token of its own)."""
    gw = _start(start_gateway, [{"name": "p", "destinations": ["127.0.0.1"], "max_per_second": 0.01}])
    statuses, threads = burst([gw], origin.url("/x"), N)
    join_all(threads)
    assert sorted(statuses) == [200] + [429] * (N - 1), statuses
    assert origin.seen("/x") == 1


def test_a_hold_learned_by_one_worker_holds_on_every_worker(start_gateway, origin):
    gw = _start(start_gateway, [{"name": "p", "destinations": ["127.0.0.1"], "max_hold": "60s"}])
    first: list[int] = []
    get_status(gw, origin.url("/answer?code=429&retry_after=30"), first)
    assert first == [429]
    gw.wait_event("protect_hold")
    wait_for(lambda: [w.get("holds") for w in _status(gw)["workers"]["workers"]] == [1] * WORKERS,
             "every worker holds it", timeout=5)
    statuses, threads = burst([gw], origin.url("/after"), N)
    join_all(threads)
    assert statuses == [429] * N
    assert origin.seen("/after") == 0


def _metric_sum(gw, name: str, **labels) -> float:
    with _opener.open(gw.admin + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))


def test_the_hold_queue_waits_across_workers_and_never_exceeds_max_concurrent(start_gateway, origin):
    """protect[].queue with two workers (worker 0 owns the budget): of N requests sent at once
    over max_concurrent 2, two reach the origin and the rest wait in their worker's line
    (the merged gauge counts both workers' lines) instead of a 429; once the origin answers,
    every one goes in turn -- slots freed in the other worker are leased over -- and the
    origin never sees more than 2 at a time. Without the queue they were 429s (the test above)."""
    n = 12
    gw = _start(start_gateway, [{"name": "q", "destinations": ["127.0.0.1"], "max_concurrent": 2,
                                 "queue": {"max_wait": "25s", "max_queued": 50}}])
    assert _served_by_both(gw)
    statuses, threads = burst([gw], origin.url("/hold"), n)
    wait_for(lambda: origin.in_flight == 2 and _metric_sum(gw, "egressgate_protect_queued", destination="q") == n - 2,
             "two in flight, the others waiting", timeout=20)
    assert statuses == [] and origin.most == 2
    origin.release.set()
    join_all(threads, 40)
    assert statuses == [200] * n, statuses
    assert origin.most == 2 and origin.seen("/hold") == n
    wait_for(lambda: _metric_sum(gw, "egressgate_protect_queue_total", destination="q",
                                 outcome="admitted_after_wait") == n - 2, "every waiter counted as admitted")
    assert _metric_sum(gw, "egressgate_protect_queued", destination="q") == 0
    assert _metric_sum(gw, "egressgate_protect_refused_total", destination="q") == 0
