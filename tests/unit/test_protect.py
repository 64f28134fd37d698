"""Shared-IP protection: the pure rules (policy/protect.py) and the limiter state
(proxy/protect.py) with an injected clock; the config keys; the 429 it answers."""

from __future__ import annotations

import email.utils
import textwrap

import pytest
from prometheus_client import generate_latest

from egressgate.config.loader import check_config_text, load_config_text
from egressgate.config.schema import ProtectConfig
from egressgate.errors import LimitReached
from egressgate.http1.parse import ResponseParser
from egressgate.http1.responses import error_response
from egressgate.model import AccessRecord, HostPort
from egressgate.observe.accesslog import AccessLog
from egressgate.observe.metrics import Metrics
from egressgate.observe.outcomes import Outcomes
from egressgate.policy.protect import (
    ProfileProtect,
    ProtectRule,
    compile_protect,
    hold_seconds,
    retry_after_seconds,
)
from egressgate.proxy.build import build_runtime
from egressgate.proxy.protect import SharedIpGuard

WALL = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def rule(name="vx", concurrent=None, rate=None, hold=300.0) -> ProtectRule:
    return ProtectRule(name, ("*.vendor-x.com",), concurrent, rate, hold)


def guard(clock: Clock, **kwargs) -> SharedIpGuard:
    return SharedIpGuard(clock, lambda: WALL, **kwargs)


def refused(g: SharedIpGuard, r: ProtectRule, member="10.0.0.1", host="api.vendor-x.com") -> LimitReached:
    with pytest.raises(LimitReached) as info:
        g.admit("p", member, r, host)
    return info.value


# --- pure: matching and Retry-After ---------------------------------------------------------

def _Spec(destinations, name=None) -> ProtectConfig:  # noqa: N802 (reads as the config it builds)
    return ProtectConfig(name=name, destinations=destinations)


@pytest.mark.parametrize("host, port, expected", [
    ("api.vendor-x.com", 443, "api"),  # the exact name is more specific than *.vendor-x.com
    ("www.vendor-x.com", 443, "all"),
    ("vendor-x.com", 443, None),  # *.vendor-x.com is subdomains only
    ("203.0.113.9", 443, "net"),
    ("203.0.113.9", 80, None),  # the CIDR names port 443
    ("example.org", 443, None),
])
def test_a_destination_falls_under_the_most_specific_rule(host, port, expected) -> None:
    protect = compile_protect([_Spec(["*.vendor-x.com"], "all"), _Spec(["api.vendor-x.com"], "api"),
                               _Spec(["203.0.113.0/24:443"], "net")])
    found = protect.match(HostPort(host, port))
    assert (found.name if found else None) == expected


def test_no_rules_compile_to_nothing_and_a_rule_without_name_is_named_by_its_patterns() -> None:
    assert compile_protect([]) is None
    assert compile_protect([_Spec(["a.test", "*.b.test"])]).rules[0].name == "a.test,*.b.test"


@pytest.mark.parametrize("value, expected", [
    (b"120", 120.0),
    (b" 5 ", 5.0),
    (b"0", None),  # nothing to wait for
    (b"-3", None),
    (b"soon", None),
    (b"99999999999999999999", None),  # absurd: not a hold
    (email.utils.formatdate(WALL + 60, usegmt=True).encode(), 60.0),
    (email.utils.formatdate(WALL - 60, usegmt=True).encode(), None),  # already past
    (b"Mon, 99 Foo 2026 99:99:99 GMT", None),
    (None, None),
])
def test_retry_after_values(value, expected) -> None:
    assert retry_after_seconds(value, WALL) == expected


@pytest.mark.parametrize("status, value, max_hold, expected", [
    (429, b"120", 300.0, 120.0),
    (503, b"120", 30.0, 30.0),  # capped by max_hold
    (429, None, 300.0, None),  # no Retry-After: no hold
    (200, b"120", 300.0, None),  # only 429 and 503 hold
    (500, b"120", 300.0, None),
    (429, b"120", 0.0, None),  # max_hold 0: holds off
])
def test_hold_seconds(status, value, max_hold, expected) -> None:
    assert hold_seconds(rule(hold=max_hold), status, value, WALL) == expected


# --- the guard ------------------------------------------------------------------------------

def test_concurrency_is_per_member_across_clients_and_a_release_frees_a_place() -> None:
    clock, r = Clock(), rule(concurrent=2)
    g = guard(clock)
    a, b = g.admit("p", "10.0.0.1", r, "api.vendor-x.com"), g.admit("p", "10.0.0.1", r, "www.vendor-x.com")
    err = refused(g, r)
    assert err.status == 429 and err.reason == "egress_concurrency_limit"
    assert err.headers == (("Retry-After", "1"),)
    assert "max_concurrent 2" in err.detail and "10.0.0.1" in err.detail and "vx" in err.detail
    g.admit("p", "10.0.0.2", r, "api.vendor-x.com")  # another member has its own count
    a.release()
    a.release()  # idempotent: a record finished twice never frees two places
    g.admit("p", "10.0.0.1", r, "api.vendor-x.com")
    refused(g, r)
    assert b.live and g.in_flight[("p", "10.0.0.1", "vx")] == 2
    assert g.refused[("p", "10.0.0.1", "vx", "concurrency")] == 2


def test_rate_is_a_token_bucket_per_member() -> None:
    clock, r = Clock(), rule(rate=2.0)
    g = guard(clock)
    for _ in range(2):  # burst: max(1, rate)
        g.admit("p", "m", r, "api.vendor-x.com").release()
    err = refused(g, r, member="m")
    assert err.reason == "egress_rate_limit" and err.headers == (("Retry-After", "1"),)
    clock.now += 0.5
    g.admit("p", "m", r, "api.vendor-x.com")
    slow = rule(name="slow", rate=0.01)
    g.admit("p", "m", slow, "api.vendor-x.com")
    assert refused(g, slow, member="m").headers == (("Retry-After", "100"),)


def test_a_refusal_takes_no_token_and_no_place() -> None:
    clock, r = Clock(), rule(concurrent=1, rate=1.0)
    g = guard(clock)
    t = g.admit("p", "m", r, "h")
    refused(g, r, member="m", host="h")  # over max_concurrent: the bucket is untouched
    t.release()
    clock.now += 1.0
    g.admit("p", "m", r, "h")
    assert g.in_flight[("p", "m", "vx")] == 1


def test_a_hold_refuses_that_member_and_host_until_it_ends() -> None:
    clock, r = Clock(), rule(hold=30.0)
    g = guard(clock)
    t = g.admit("p", "m1", r, "api.vendor-x.com")
    t.answered(429, [(b"Content-Length", b"0"), (b"retry-after", b"120")])
    err = refused(g, r, member="m1")
    assert err.reason == "origin_backoff" and err.headers == (("Retry-After", "30"),)
    assert "answered 429 with Retry-After" in err.detail
    g.admit("p", "m2", r, "api.vendor-x.com")  # another member: not held
    g.admit("p", "m1", r, "www.vendor-x.com")  # another host: not held
    clock.now += 29.2
    assert refused(g, r, member="m1").headers == (("Retry-After", "1"),)
    assert g.current_holds("p")[0]["remaining_seconds"] == pytest.approx(0.8)
    clock.now += 1.0
    g.admit("p", "m1", r, "api.vendor-x.com")
    assert len(g.holds) == 0 and not g.holds and g.current_holds() == []
    assert g.holds_started[("p", "m1", "vx")] == 1 and g.refused[("p", "m1", "vx", "hold")] == 2


def _held(g: SharedIpGuard) -> list[str]:
    return sorted(h.host for h in g.holds.live())


def _answer(g: SharedIpGuard, r: ProtectRule, host: str, client: str, seconds: int = 100,
            address: str | None = None, member: str = "m") -> None:
    t = g.admit("p", member, r, host, client)
    t.moved(member, address)
    t.answered(429, [(b"retry-after", str(seconds).encode())])


def test_a_client_whose_share_is_full_replaces_only_its_own_hold_ending_soonest() -> None:
    clock = Clock()
    r = ProtectRule("vx", ("*.vendor-x.com",), None, None, 300.0, max_holds=100, max_holds_per_client=3)
    g = guard(clock)
    _answer(g, r, "real.vendor-x.com", "victim", seconds=10)  # ends soonest of all
    for i in range(10):
        _answer(g, r, f"h{i}.vendor-x.com", "attacker", seconds=100 + i)
    assert _held(g) == ["h7.vendor-x.com", "h8.vendor-x.com", "h9.vendor-x.com", "real.vendor-x.com"]
    assert refused(g, r, member="m", host="real.vendor-x.com").reason == "origin_backoff"
    assert g.holds.dropped == {("p", "m", "vx", "client_share"): 7}
    clock.now += 1000  # the attacker's own expired holds make room first
    _answer(g, r, "x.vendor-x.com", "attacker")
    assert _held(g) == ["x.vendor-x.com"]
    assert g.holds.dropped == {("p", "m", "vx", "client_share"): 7}


def test_a_full_rule_never_evicts_a_hold_its_client_did_not_cause() -> None:
    """max_holds 4, two attackers of 2 each fill it: a third client's new hold is not recorded
    (counted), the victim's hold already there stays; an attacker replaces only its own."""
    clock = Clock()
    r = ProtectRule("vx", ("*.vendor-x.com",), None, None, 300.0, max_holds=4, max_holds_per_client=2)
    g = guard(clock)
    _answer(g, r, "real.vendor-x.com", "victim", seconds=5)
    for who in ("a1", "a2"):
        for i in range(5):
            _answer(g, r, f"{who}-{i}.vendor-x.com", who, seconds=100 + i)
    assert "real.vendor-x.com" in _held(g) and len(g.holds) == 4
    assert refused(g, r, member="m", host="real.vendor-x.com").reason == "origin_backoff"
    _answer(g, r, "late.vendor-x.com", "third")
    assert "late.vendor-x.com" not in _held(g)
    assert g.holds.dropped[("p", "m", "vx", "rule_full")] >= 1
    stats = g.stats()
    assert stats["holds_dropped"][("p", "m", "vx", "rule_full")] >= 1
    other = ProtectRule("vy", ("*.vendor-y.com",), None, None, 300.0, max_holds=4, max_holds_per_client=2)
    _answer(g, other, "a.vendor-y.com", "third")  # another rule has its own table
    assert "a.vendor-y.com" in _held(g)


def test_a_hold_covers_the_name_and_the_address_it_was_connected_to() -> None:
    clock, r = Clock(), rule(hold=60.0)
    g = guard(clock)
    _answer(g, r, "api.vendor-x.com", "job", seconds=30, address="203.0.113.7")
    err = refused(g, r, member="m", host="203.0.113.7")  # its IP literal
    assert "203.0.113.7 (as api.vendor-x.com) answered 429" in err.detail
    with pytest.raises(LimitReached):  # another name, resolved to the same address
        g.admit("p", "m", r, "www.vendor-x.com", "other", ["198.51.100.1", "203.0.113.7"])
    g.admit("p", "m", r, "www.vendor-x.com", "other", ["198.51.100.1"])
    g.admit("p", "m2", r, "203.0.113.7")  # another member: not held
    # an answer (to a request admitted before the hold) for an address already held: the
    # address stays with the longer hold, never shortened; the new hold adds only its name
    _answer(g, r, "x.vendor-x.com", "job", seconds=5, address="203.0.113.7")
    refused(g, r, member="m", host="x.vendor-x.com")
    clock.now += 10
    refused(g, r, member="m", host="203.0.113.7")
    assert [(h["host"], h["remaining_seconds"]) for h in g.current_holds("p")] == [("api.vendor-x.com", 20.0)]
    clock.now += 25
    g.admit("p", "m", r, "203.0.113.7")
    g.admit("p", "m", r, "api.vendor-x.com")


def test_a_ticket_moves_with_failover() -> None:
    g = guard(Clock())
    t = g.admit("p", "m1", rule(concurrent=1), "api.vendor-x.com")
    t.moved("m2")
    assert g.in_flight[("p", "m1", "vx")] == 0 and g.in_flight[("p", "m2", "vx")] == 1
    t.release()
    t.moved("m3")  # released: nothing moves
    assert g.in_flight[("p", "m2", "vx")] == 0 and ("p", "m3", "vx") not in g.in_flight


def test_metric_labels_are_configured_names_never_hosts() -> None:
    clock, r = Clock(), rule(concurrent=1)
    g = guard(clock)
    g.admit("p", "m", r, "secret-host.vendor-x.com").answered(429, [(b"retry-after", b"60")])
    refused(g, r, member="m", host="other.vendor-x.com")
    stats = g.stats()
    keys = [k for table in stats.values() for k in table]
    assert keys and all("vendor-x.com" not in part for k in keys for part in k)
    assert stats["held"] == {("p", "m", "vx"): 1}
    metrics = Metrics()
    metrics.watch_protect(g.stats)
    text = generate_latest(metrics.registry).decode()
    assert 'egressgate_protect_refused_total{destination="vx",limit="concurrency",member="m",profile="p"} 1.0' in text
    assert "vendor-x.com" not in text


def test_a_finished_record_releases_its_admission() -> None:
    g = guard(Clock())
    rec = AccessRecord("127.0.0.1", "l", 0.0)
    rec.protect = g.admit("p", "m", rule(concurrent=1), "api.vendor-x.com")
    Outcomes(Metrics(), AccessLog("none")).finished(rec, 200)
    assert g.in_flight[("p", "m", "vx")] == 0


# --- the answer, the config -----------------------------------------------------------------

class _Sink:
    head = None
    ended = False

    def on_response_head(self, head) -> None:
        self.head = head

    def on_response_body(self, data: bytes) -> None:
        pass

    def on_response_end(self) -> None:
        self.ended = True


def test_the_429_carries_retry_after_and_names_the_limit() -> None:
    g = guard(Clock())
    r = rule(rate=0.5)
    g.admit("p", "m", r, "api.vendor-x.com")
    err = refused(g, r, member="m")
    sink = _Sink()
    ResponseParser(sink, "GET").feed(error_response(err, keep_alive=True))
    assert sink.ended and sink.head.status == 429 and sink.head.reason == b"Egress Rate Limit"
    headers = {k.lower(): v for k, v in sink.head.headers}
    assert headers[b"retry-after"] == b"2"
    assert headers[b"proxy-status"].startswith(b"egressgate; error=connection_limit_reached; details=")
    assert b"max_per_second 0.5" in headers[b"proxy-status"]


def test_protect_config_errors_name_file_line_key() -> None:
    text = textwrap.dedent("""\
        egress:
          px:
            bind: [10.0.0.1]
            protect:
              - name: vx
                destinations: ["*.vendor-x.com", "not a host!"]
                max_concurrent: 0
              - name: vy
                destinations: []
                max_hold: -1
              - name: vx
                destinations: [a.test]
    """)
    errors = check_config_text(text, "c.yaml").errors
    assert "c.yaml:7: egress.px.protect[0].max_concurrent: must be greater than 0, got 0" in errors
    assert any(e.startswith("c.yaml:6: egress.px.protect[0].destinations[1]: bad destination pattern") for e in errors)
    assert any(e.startswith("c.yaml:9: egress.px.protect[1].destinations:") for e in errors)
    assert "c.yaml:10: egress.px.protect[1].max_hold: a duration cannot be negative" in errors
    assert any(e.startswith("c.yaml:11: egress.px.protect[2].name: two protect rules named 'vx'") for e in errors)


def test_only_profiles_with_rules_are_compiled() -> None:
    cfg = load_config_text(textwrap.dedent("""\
        egress:
          px: {bind: [10.0.0.1], protect: [{destinations: ["*.vendor-x.com"], max_per_second: 5}]}
          py: {bind: [10.0.0.2]}
    """))
    rt = build_runtime(cfg, "", "c.yaml")
    assert set(rt.protect) == {"px"} and rt.protect["px"].rules[0].max_per_second == 5
    assert build_runtime(load_config_text(""), "", "-").protect == {}


def test_the_match_cache_is_bounded_and_never_used_when_a_pattern_names_a_port() -> None:
    protect = ProfileProtect([rule(name="all")], cache_size=3)
    for i in range(10):
        assert protect.match(HostPort(f"h{i}.vendor-x.com", 443)).name == "all"
        assert protect.match(HostPort(f"h{i}.example.org", 443)) is None
        assert len(protect._cache) <= 3
    assert protect.match(HostPort("h9.example.org", 443)) is None  # (from the cache)
    ported = compile_protect([_Spec(["*.vendor-x.com:8443"], "alt")])
    assert ported._cache is None
    assert ported.match(HostPort("a.vendor-x.com", 8443)).name == "alt"
    assert ported.match(HostPort("a.vendor-x.com", 443)) is None


def test_queue_config_errors_name_file_line_key() -> None:
    text = textwrap.dedent("""\
        egress:
          px:
            bind: [10.0.0.1]
            protect:
              - name: vx
                destinations: ["*.vendor-x.com"]
                max_concurrent: 2
                queue:
                  max_wait: 0
                  max_queued: 0
              - name: vy
                destinations: [a.test]
                queue:
                  max_wait: 2h
              - name: vz
                destinations: [b.test]
                queue: {wait: 3}
    """)
    errors = check_config_text(text, "c.yaml").errors
    assert any(e.startswith("c.yaml:9: egress.px.protect[0].queue.max_wait: expected a wait above 0") for e in errors)
    assert "c.yaml:10: egress.px.protect[0].queue.max_queued: must be at least 1, got 0" in errors
    assert any(e.startswith("c.yaml:14: egress.px.protect[1].queue.max_wait: expected a wait above 0 and at most "
                            "600s") for e in errors)
    assert any(e.startswith("c.yaml:17: egress.px.protect[2].queue.wait: unknown key") for e in errors)
    rt = build_runtime(load_config_text(textwrap.dedent("""\
        egress:
          px: {bind: [10.0.0.1], protect: [{destinations: [a.test], max_concurrent: 1, queue: {max_wait: 5s}}]}
    """)), "", "c.yaml")
    compiled = rt.protect["px"].rules[0]
    assert (compiled.max_wait, compiled.max_queued) == (5.0, 100)
    assert compiled.describe()["queue"] == {"max_wait": 5.0, "max_queued": 100}


def test_the_hold_queue_takes_clients_in_turn_and_each_client_in_order() -> None:
    """Rows per client take turns in the order clients first joined; within a row, arrival
    order. A line is bounded by max_queued and disappears once nobody waits."""
    import asyncio

    from egressgate.proxy.waiting import Waitlines

    key = ("px", "10.0.0.1", "vx")
    lines = Waitlines(lambda: 0.0)

    async def run() -> list[str]:
        waiters = {name: lines.join(key, name[0], 4) for name in ("a1", "a2", "a3", "b1")}
        assert lines.join(key, "c", 4) is None  # full
        order = []
        for _ in waiters:
            head = lines.lines[key].head
            name = next(n for n, w in waiters.items() if w is head)
            assert await lines.turn(key, head, 0.0)
            order.append(name)
            lines.leave(key, head, "admitted_after_wait")
        return order

    assert asyncio.run(run()) == ["a1", "b1", "a2", "a3"]
    assert key not in lines.lines
    assert lines.outcomes == {(*key, "queue_full"): 1, (*key, "admitted_after_wait"): 4}
