"""Across instances (issue 28, item 2): two gateway instances x two workers share shared-IP
limits and holds through a real ``redis-server`` (started here, killed by pid). The provider is
a counting loopback origin: it never sees more than ``max_concurrent``; one token bucket serves
the fleet; a hold learned by one instance refuses on the other within a second; with Redis
killed the documented fallback applies at once (no hang, no descriptor growth) and the fleet
comes back when Redis does; a killed instance's slots come back within ``lease_ttl``."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request

import pytest

from .counting import CountingOrigin
from .peers import HTTPPeer, QuietHandler, ReservedPort, base_config, burst, get_status, join_all, wait_for
from .redisserver import RedisServer

WORKERS = 2
N = 24  # requests sent at once, each on its own connection, spread over both instances
LEASE_TTL = 2.0


@pytest.fixture
def redis(tmp_path):
    r = RedisServer(tmp_path)
    yield r
    r.kill()


@pytest.fixture
def origin():
    o = CountingOrigin()
    yield o
    o.close()


def _config(port: str, redis_url: str, protect: list[dict], **fleet) -> dict:
    return base_config(listen=[{"address": port}], workers=WORKERS,
                       egress={"default": {"direct": {}, "protect": protect}},
                       fleet={"redis": {"url": redis_url, "lease_ttl": LEASE_TTL, "timeout": "250ms"}, **fleet})


def _instances(start_gateway, redis: RedisServer, protect: list[dict], n: int = 2, fleet_size: int | None = None,
               redis_extra: dict | None = None, **fleet) -> list:
    gws = []
    for _ in range(n):
        with ReservedPort() as port:  # workers need a fixed port: held until they listen on it
            cfg = _config(port.address, redis.url, protect, **fleet)
            cfg["fleet"]["redis"].update(redis_extra or {})
            gw = start_gateway(cfg)
            wait_for(lambda g=gw: len([e for e in g.events if e.get("event") == "started"]) >= WORKERS,
                     "every worker started")
        gws.append(gw)
    for gw in gws:  # every instance has seen every other in the store
        wait_for(lambda g=gw: _metric(g, "egressgate_fleet_instances") == (fleet_size or n), "the fleet's heartbeats",
                 timeout=10)
    return gws


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(gw, path: str) -> str:
    with _opener.open(gw.admin + path, timeout=10) as r:
        return r.read().decode()


def _metric(gw, name: str, **labels) -> float | None:
    for line in _get(gw, "/metrics").splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and \
                all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def _fds(gw) -> int:
    """Descriptors of the instance's worker processes together."""
    pids = [gw.pid] + [w["pid"] for w in json.loads(_get(gw, "/status"))["workers"]["workers"][1:]]
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


def test_two_instances_never_exceed_max_concurrent(start_gateway, redis, origin):
    """max_concurrent 3 across 2 instances x 2 workers: the origin never sees more than 3 at
    once; the rest are refused. Released, the slots serve a burst sent to the other instance
    alone (it gets them back from the first: `want`)."""
    gws = _instances(start_gateway, redis, [{"name": "p", "destinations": ["127.0.0.1"], "max_concurrent": 3}])
    statuses, threads = burst(gws, origin.url("/hold"), N)
    wait_for(lambda: len(statuses) + origin.in_flight >= N, "every request admitted or refused", timeout=20)
    assert origin.in_flight == 3 and origin.most == 3, (origin.in_flight, origin.most, statuses)
    origin.release.set()
    join_all(threads)
    assert statuses.count(200) == 3 and statuses.count(429) == N - 3, statuses
    wait_for(lambda: origin.in_flight == 0, "the origin idle")
    # the other instance alone: it has to get the slots the first one holds
    for gw in gws:
        origin.release.clear()
        admitted: list[int] = []
        deadline = time.monotonic() + 20
        threads = []
        while origin.in_flight < 3 and time.monotonic() < deadline:  # (a 429 while the slots move: try again)
            t = threading.Thread(target=get_status, args=(gw, origin.url("/hold"), admitted), daemon=True)
            t.start()
            threads.append(t)
            sent = len(threads)
            wait_for(lambda a=admitted, n=sent: len(a) + origin.in_flight >= n, "answered or in flight")
        assert origin.in_flight == 3 and origin.most == 3, (origin.in_flight, origin.most)
        origin.release.set()
        join_all(threads)
        wait_for(lambda: origin.in_flight == 0, "the origin idle")


def test_one_token_bucket_for_the_fleet(start_gateway, redis, origin):
    """max_per_second 0.01 (one token): of N requests to two instances, exactly one reaches
    the origin."""
    gws = _instances(start_gateway, redis, [{"name": "p", "destinations": ["127.0.0.1"], "max_per_second": 0.01}])
    statuses, threads = burst(gws, origin.url("/x"), N)
    join_all(threads)
    assert sorted(statuses) == [200] + [429] * (N - 1), statuses
    assert origin.seen("/x") == 1


def test_the_rate_stays_within_the_published_bound(start_gateway, redis, origin):
    """max_per_second 4 over both instances, requests sent as fast as 8 threads can for a
    while: what reaches the origin in the window stays within max(1, r) + r * (W + S)
    (S: egressgate_fleet_rate_slack_seconds), and is well above a single instance's share."""
    rate = 4.0
    gws = _instances(start_gateway, redis, [{"name": "p", "destinations": ["127.0.0.1"], "max_per_second": rate}])
    slack = _metric(gws[0], "egressgate_fleet_rate_slack_seconds")
    assert slack is not None and slack > 0
    stop = time.monotonic() + 3.0
    statuses: list[int] = []

    def hammer(i: int) -> None:
        while time.monotonic() < stop and len(statuses) < 2000:
            get_status(gws[i % 2], origin.url("/r"), statuses)

    start = time.monotonic()
    threads = [threading.Thread(target=hammer, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    join_all(threads)
    window = time.monotonic() - start
    admitted = origin.seen("/r")
    bound = max(1.0, rate) + rate * (window + slack)
    assert statuses.count(200) == admitted and admitted <= bound, (admitted, bound, window)
    assert admitted >= rate, admitted  # (the fleet did admit: the test tests something)


def test_a_hold_learned_by_one_instance_refuses_on_the_other_within_a_second(start_gateway, redis, origin):
    a, b = _instances(start_gateway, redis, [{"name": "p", "destinations": ["127.0.0.1"], "max_hold": "60s"}])
    first: list[int] = []
    get_status(a, origin.url("/answer?code=429&retry_after=30"), first)
    assert first == [429]
    learned = time.monotonic()
    a.wait_event("protect_hold")
    wait_for(lambda: json.loads(_get(b, "/status"))["profiles"]["default"]["protect"]["holds"], "B holds it",
             timeout=1.0)
    assert time.monotonic() - learned < 1.5
    statuses, threads = burst([b], origin.url("/after"), 8)
    join_all(threads)
    assert statuses == [429] * 8 and origin.seen("/after") == 0
    # an instance that starts later learns the holds in force from the store
    late = _instances(start_gateway, redis, [{"name": "p", "destinations": ["127.0.0.1"], "max_hold": "60s"}], n=1,
                      fleet_size=3)
    assert json.loads(_get(late[0], "/status"))["profiles"]["default"]["protect"]["holds"]


def test_redis_killed_mid_run_falls_back_without_hanging_or_leaking(start_gateway, redis, origin):
    """fallback: share with max_concurrent 4 and two instances: Redis killed, each instance
    keeps 4 // 2 = 2 slots -- at once, logged once, shown by egressgate_fleet_store_up --
    requests never hang, descriptors do not grow; Redis back, the fleet's limit applies again."""
    gws = _instances(start_gateway, redis, [{"name": "p", "destinations": ["127.0.0.1"], "max_concurrent": 4}])
    # the first instance's workers hold all 4 slots, idle, when Redis goes: they give back
    # what is beyond its share of 2 (else the two instances would admit 4 + 2)
    statuses, threads = burst([gws[0]], origin.url("/hold"), 4)
    wait_for(lambda: len(statuses) + origin.in_flight >= 4, "every request admitted or refused", timeout=20)
    assert origin.in_flight == 4, statuses
    origin.release.set()
    join_all(threads)
    wait_for(lambda: origin.in_flight == 0, "the origin idle")
    before = [_fds(gw) for gw in gws]
    redis.kill()
    for gw in gws:
        gw.wait_event("fleet_store_down", timeout=10)
    for _ in range(3):  # held requests: each instance admits its share, refuses the rest, all answered
        origin.release.clear()
        statuses, threads = burst(gws, origin.url("/hold"), 12)
        wait_for(lambda s=statuses: len(s) + origin.in_flight >= 12, "every request admitted or refused",
                 timeout=20)
        assert origin.in_flight <= 4, (origin.in_flight, statuses)
        origin.release.set()
        join_all(threads)
        assert set(statuses) <= {200, 429}, statuses
        wait_for(lambda: origin.in_flight == 0, "the origin idle")
    for gw in gws:
        assert _metric(gw, "egressgate_fleet_store_up") == 0
        errors = [line for line in _get(gw, "/metrics").splitlines()
                  if line.startswith("egressgate_fleet_store_errors_total{")]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in errors) >= 1, errors
        assert len([e for e in gw.events if e.get("event") == "fleet_store_down"]) == 1  # logged once
    after = [_fds(gw) for gw in gws]
    assert all(x <= y + 4 for x, y in zip(after, before, strict=True)), (before, after)
    redis.restart()
    for gw in gws:
        gw.wait_event("fleet_store_up", timeout=10)
        wait_for(lambda g=gw: _metric(g, "egressgate_fleet_store_up") == 1, "store up again")
    origin.release.clear()
    statuses, threads = burst(gws, origin.url("/hold"), N)
    wait_for(lambda: len(statuses) + origin.in_flight >= N, "every request admitted or refused", timeout=20)
    assert origin.in_flight <= 4
    origin.release.set()
    join_all(threads)


def test_a_slow_redis_does_not_slow_requests(start_gateway, redis, origin):
    """Redis stops answering (DEBUG SLEEP): every request is answered (admitted or refused)
    while Redis still sleeps -- request latency does not follow the store's -- the fallback
    is logged, and when Redis answers again the instances say so."""
    gws = _instances(start_gateway, redis, [{"name": "p", "destinations": ["127.0.0.1"], "max_concurrent": 4,
                                             "max_per_second": 1000}])
    asleep = threading.Event()
    woke: list[bytes] = []

    def sleep() -> None:
        asleep.set()
        woke.append(redis.command("DEBUG", "SLEEP", "6", timeout=30))

    sleeper = threading.Thread(target=sleep, daemon=True)
    sleeper.start()
    asleep.wait(5)
    wait_for(lambda: not redis.ping(), "redis asleep")  # (PING times out while it sleeps)
    statuses, threads = burst(gws, origin.url("/x"), 12)
    join_all(threads)
    assert not woke, "requests waited for Redis"
    assert set(statuses) <= {200, 429} and len(statuses) == 12, statuses
    for gw in gws:
        gw.wait_event("fleet_store_down", timeout=10)
    sleeper.join(30)
    assert woke and woke[0].startswith(b"+OK"), woke
    for gw in gws:
        gw.wait_event("fleet_store_up", timeout=10)


def test_a_killed_instances_slots_come_back_within_lease_ttl(start_gateway, redis, origin):
    a, b = _instances(start_gateway, redis, [{"name": "p", "destinations": ["127.0.0.1"], "max_concurrent": 2}])
    statuses, threads = burst([a], origin.url("/hold"), 2)
    wait_for(lambda: origin.in_flight == 2, "A holds both slots")
    refused: list[int] = []
    get_status(b, origin.url("/x"), refused)
    assert refused == [429]
    a.proc.kill()  # SIGKILL: no goodbye to the store (its workers follow: PR_SET_PDEATHSIG)
    a.proc.wait(10)
    killed = time.monotonic()
    answers: list[int] = []
    wait_for(lambda: (get_status(b, origin.url("/x"), answers), answers[-1] == 200)[1],
             "B admitted once A's lease lapsed", timeout=LEASE_TTL + 5, interval=0.1)
    came_back = time.monotonic() - killed
    assert came_back <= LEASE_TTL + 2, came_back
    origin.release.set()
    join_all(threads)


def test_tls_and_auth_as_memorystore_offers_them(start_gateway, tmp_path, origin):
    """A redis-server that speaks TLS only and asks for AUTH (as Memorystore with in-transit
    encryption and AUTH): two instances reach it with ``rediss://``, the CA and a
    password_file, and share one token bucket through it. An instance with a wrong password
    does not reach it: the fallback applies, logged as fleet_store_down."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "redis.pem", tmp_path / "redis.key"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    password = "s3cret-fleet"
    (tmp_path / "pw").write_text(password + "\n")
    (tmp_path / "bad").write_text("wrong\n")
    server = RedisServer(tmp_path, password=password, tls=(str(cert_file), str(key_file)))
    try:
        protect = [{"name": "p", "destinations": ["127.0.0.1"], "max_per_second": 0.01}]
        tls = {"password_file": str(tmp_path / "pw"), "tls": {"ca": str(ca_file)}}
        gws = _instances(start_gateway, server, protect, redis_extra=tls)
        statuses, threads = burst(gws, origin.url("/x"), N)
        join_all(threads)
        assert sorted(statuses) == [200] + [429] * (N - 1), statuses
        assert origin.seen("/x") == 1
        with ReservedPort() as port:
            bad = start_gateway(_config(port.address, server.url, protect)
                                | {"fleet": {"redis": {"url": server.url, "password_file": str(tmp_path / "bad"),
                                                       "tls": {"ca": str(ca_file)}, "timeout": "250ms"}}})
            down = bad.wait_event("fleet_store_down", timeout=10)
        assert "auth" in down["error"].lower() or "password" in down["error"].lower(), down
    finally:
        server.kill()



class _CountingProvider(HTTPPeer):
    """A loopback provider answering 200 to GET/HEAD /ping, counting every check it gets."""

    def __init__(self) -> None:
        self.hits = 0
        lock = threading.Lock()
        provider = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:  # noqa: N802
                with lock:
                    provider.hits += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_HEAD = do_GET  # noqa: N815

        super().__init__(Handler)


def test_provider_checks_are_shared_by_the_fleet(start_gateway, redis):
    """Two instances x two workers, one member x one provider: the provider is checked once per
    interval for the whole fleet (four processes, one check), and every instance shows the result,
    naming the instance that checked. A reload does not check again what the fleet checked within
    the interval."""
    provider = _CountingProvider()
    try:
        profile = {"bind": ["127.0.0.2"], "providers": [
            {"name": "vendor", "url": f"http://127.0.0.1:{provider.port}/ping", "interval": "300s"}]}
        gws = []
        for _ in range(2):
            with ReservedPort() as port:
                cfg = base_config(listen=[{"address": port.address}], workers=WORKERS,
                                  egress={"default": {"direct": {}}, "shared": profile},
                                  fleet={"redis": {"url": redis.url, "lease_ttl": LEASE_TTL, "timeout": "250ms"}})
                gw = start_gateway(cfg)
                wait_for(lambda g=gw: len([e for e in g.events if e.get("event") == "started"]) >= WORKERS,
                         "every worker started")
            gws.append(gw)

        def checks(gw) -> list[dict]:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(gw.admin + "/status",
                                                                                   timeout=5) as r:
                view = json.loads(r.read())["profiles"]["shared"]["providers"]
            return view["checks"] if view else []

        def ok(gw) -> bool:
            found = checks(gw)
            return bool(found) and all(c.get("ok") for c in found)

        for gw in gws:
            wait_for(lambda g=gw: ok(g), "the provider's result on the instance", timeout=20)
        assert provider.hits == 1, f"{provider.hits} checks for one member x provider in one interval"
        details = [c["detail"] for gw in gws for c in checks(gw)]
        assert any("checked by instance" in d for d in details), details
        before = provider.hits
        n = len(gws[1].events)
        gws[1].signal(signal.SIGHUP)
        gws[1].wait_event("reloaded", after=n)
        wait_for(lambda: ok(gws[1]), "the result after the reload", timeout=20)
        assert provider.hits == before
    finally:
        provider.close()


def _metric_sum(gw, name: str, **labels) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in _get(gw, "/metrics").splitlines()
               if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))


def test_the_hold_queue_waits_for_the_fleets_slots(start_gateway, redis, origin):
    """protect[].queue over the fleet store: max_concurrent 2 for 2 instances x 2 workers; of N
    requests sent at once to both instances, two reach the origin and the others wait (each in
    its worker's line: the queued gauges of both instances add up to N - 2) rather than a 429;
    once the origin answers, every one of them goes as slots come back through Redis's
    leases, and the origin never sees more than 2 at once."""
    n = 12
    gws = _instances(start_gateway, redis, [{"name": "q", "destinations": ["127.0.0.1"], "max_concurrent": 2,
                                             "queue": {"max_wait": "25s", "max_queued": 50}}])

    def queued() -> float:
        return sum(_metric_sum(gw, "egressgate_protect_queued", destination="q") for gw in gws)

    statuses, threads = burst(gws, origin.url("/hold"), n)
    wait_for(lambda: origin.in_flight == 2 and queued() == n - 2, "two in flight, the others waiting", timeout=20)
    assert statuses == [] and origin.most == 2
    origin.release.set()
    join_all(threads, 40)
    assert statuses == [200] * n, statuses
    assert origin.most == 2 and origin.seen("/hold") == n
    wait_for(lambda: sum(_metric_sum(gw, "egressgate_protect_queue_total", destination="q",
                                     outcome="admitted_after_wait") for gw in gws) == n - 2,
             "every waiter counted as admitted")
    assert queued() == 0
    assert sum(_metric_sum(gw, "egressgate_protect_refused_total", destination="q") for gw in gws) == 0
