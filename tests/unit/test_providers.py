"""Provider checks, the pure half: the ``providers`` / ``switch`` keys (errors as FILE:LINE: key),
``ProviderSpec`` (accept ranges, TLS-only), ``ProviderBoard`` (what is due, what readiness
says, what survives a reload) and ``new_members`` (what a verified switch must check)."""

from __future__ import annotations

import textwrap

import pytest

from egressgate.config.loader import check_config_text
from egressgate.config.schema import ProviderConfig
from egressgate.egress.plan import EgressPlan, ProfilePool
from egressgate.egress.providers import (
    ProviderBoard,
    ProviderResult,
    ProviderSpec,
    compile_board,
    format_matrix,
    new_members,
    not_ready,
    profile_view,
)

FILE = "gw.yaml"


def errors_of(providers: str, extra: str = "") -> list[str]:
    text = textwrap.dedent("""\
        egress:
          x:
            bind: [127.0.0.2]
        """) + textwrap.indent(textwrap.dedent(providers), "    ") + extra
    return check_config_text(text, FILE).errors


@pytest.mark.parametrize(("providers", "expected"), [
    ("providers: [{name: v, url: 'https://v.test/', accept: [99]}]",
     f"{FILE}:4: egress.x.providers[0].accept: not a range of HTTP statuses (100-599, low first): 99"),
    ("providers: [{name: v, url: 'https://v.test/', accept: [300-200]}]",
     f"{FILE}:4: egress.x.providers[0].accept: not a range of HTTP statuses (100-599, low first): '300-200'"),
    ("providers: [{name: v, url: 'https://v.test/', accept: [ok]}]",
     f"{FILE}:4: egress.x.providers[0].accept: not an HTTP status or LOW-HIGH range: 'ok'"),
    ("providers: [{name: v, url: 'https://v.test/', accept: []}]",
     f"{FILE}:4: egress.x.providers[0].accept: expected 'tls' or a list of HTTP statuses and ranges such as "
     "[200-399, 401]"),
    ("providers: [{name: v, url: 'ftp://v.test/'}]",
     f"{FILE}:4: egress.x.providers[0].url: expected an http:// or https:// URL with a host, got 'ftp://v.test/'"),
    ("providers: [{name: v, url: 'https://u:p@v.test/'}]",
     f"{FILE}:4: egress.x.providers[0].url: a provider URL carries no credentials"),
    ("providers: [{name: v, url: 'http://v.test/', accept: tls}]",
     f"{FILE}:4: egress.x.providers[0]: accept: tls needs an https:// URL"),
    ("providers: [{name: v, url: 'https://v.test/', method: POST}]",
     f"{FILE}:4: egress.x.providers[0].method: write 'HEAD' or 'GET', not text 'POST'"),
    ("providers: [{name: 'a b', url: 'https://v.test/'}]",
     f"{FILE}:4: egress.x.providers[0].name: 'a b': use only letters, digits, '_', '.' and '-'"),
    ("providers: [{name: v, url: 'https://v.test/'}, {name: v, url: 'https://w.test/'}]",
     f"{FILE}:2: egress.x: provider names must be unique in a profile: v, v"),
    ("switch: verified",
     f"{FILE}:2: egress.x: switch: verified needs providers to verify new members against"),
    ("switch: sometimes",
     f"{FILE}:4: egress.x.switch: write 'immediate', 'verified' or 'auto', not text 'sometimes'"),
])
def test_bad_keys_name_file_line_and_key(providers: str, expected: str) -> None:
    assert errors_of(providers) == [expected]


def test_good_keys() -> None:
    assert errors_of("""\
        switch: verified
        providers:
          - {name: vendor-x, url: "https://api.vendor-x.test/v1/ping", accept: [200-399, 401], timeout: 2s}
          - {name: vendor-y, url: "https://vendor-y.test/", accept: tls, required: true, interval: 5m}
        """) == []


def spec(accept="default", url="https://v.test:8443/ping?x=1", **kw) -> ProviderSpec:
    raw = {"name": "v", "url": url, **kw}
    if accept != "default":
        raw["accept"] = accept
    return ProviderSpec.compile(ProviderConfig.model_validate(raw), 10.0, 300.0)


def test_spec_compiles_url_and_defaults() -> None:
    s = spec()
    assert (str(s.dest), s.tls, s.path, s.method, s.timeout, s.interval) == \
        ("v.test:8443", True, "/ping?x=1", "HEAD", 10.0, 300.0)
    assert spec(url="http://v.test").dest.port == 80
    assert spec().host_header == "v.test:8443"
    assert spec(url="https://v.test/").host_header == "v.test"
    assert spec(url="http://[2001:db8::1]/").host_header == "[2001:db8::1]"
    assert spec(url="http://[2001:db8::1]:8080/").host_header == "[2001:db8::1]:8080"
    assert spec(timeout="2s", interval="1m").timeout == 2.0


@pytest.mark.parametrize(("accept", "status", "ok"), [
    ("default", 200, True), ("default", 399, True), ("default", 403, False), ("default", 199, False),
    ([401], 401, True), (["200-204", 401], 204, True), (["200-204", 401], 205, False),
    ("tls", 200, False),  # accept: tls judges the handshake, never a status
])
def test_accepts(accept, status: int, ok: bool) -> None:
    assert spec(accept).accepts(status) is ok


def test_expects_reads_back() -> None:
    assert spec(["200-399", 401]).expects == "200-399, 401"
    assert spec("tls").expects == "TLS handshake"


def members(*sources: str) -> list[EgressPlan]:
    return [EgressPlan("x", "bind", source=s) for s in sources]


def pool_of(*sources: str) -> ProfilePool:
    return ProfilePool("x", "bind", members(*sources), (), "sticky", 5.0, lambda: 0.0)


def result(member: str, provider: str = "v", outcome: str = "accepted", at: float = 1000.0) -> ProviderResult:
    return ProviderResult("x", member, provider, outcome, "HTTP/1.1 200 OK", at)


def board(required: bool = False, interval: float = 60.0) -> ProviderBoard:
    s = spec(required=required, interval=interval)
    return ProviderBoard(specs={"x": (s,)}, switch={"x": "verified"})


def test_due_lists_unchecked_and_stale_checks() -> None:
    b, p = board(interval=60.0), pool_of("10.0.0.1", "10.0.0.2")
    b.record(result("10.0.0.1", at=1000.0))
    assert [m.source for m, _ in b.due(p, 1030.0)] == ["10.0.0.2"]
    assert [m.source for m, _ in b.due(p, 1060.0)] == ["10.0.0.1", "10.0.0.2"]
    assert b.next_due({"x": p}, 1030.0) == 0.0
    b.record(result("10.0.0.2", at=1010.0))
    assert b.next_due({"x": p}, 1030.0) == 30.0
    assert ProviderBoard().next_due({"x": p}, 0.0) is None


@pytest.mark.parametrize(("required", "checks", "reasons"), [
    (False, [], []),
    (True, [], ["profile x: provider v not checked yet through 10.0.0.1"]),
    (True, [("10.0.0.1", "accepted")], []),
    (True, [("10.0.0.1", "http_status")], ["profile x: provider v refuses 10.0.0.1: http_status: HTTP/1.1 200 OK"]),
    (False, [("10.0.0.1", "reset")], []),
])
def test_not_ready_only_for_required_providers(required: bool, checks, reasons) -> None:
    b = board(required=required)
    for member, outcome in checks:
        b.record(result(member, outcome=outcome))
    assert not_ready(b, pool_of("10.0.0.1")) == reasons


def test_adopt_keeps_results_of_unchanged_checks_only() -> None:
    old = board()
    old.record(result("10.0.0.1"))
    old.record(result("10.0.0.2"))
    pools = {"x": pool_of("10.0.0.1")}
    same = board()
    same.adopt(old, pools)
    assert same.result("x", "10.0.0.1", "v") is not None
    assert same.result("x", "10.0.0.2", "v") is None  # that member is gone: its result too
    changed = ProviderBoard(specs={"x": (spec(["200"]),)})  # the provider's accept changed: check again
    changed.adopt(old, pools)
    assert changed.result("x", "10.0.0.1", "v") is None
    gone = ProviderBoard()
    gone.adopt(old, pools)
    assert gone.results == {}


def test_new_members() -> None:
    assert new_members(pool_of("10.0.0.1"), pool_of("10.0.0.1", "10.0.0.2")) == members("10.0.0.2")
    assert new_members(pool_of("10.0.0.1", "10.0.0.2"), pool_of("10.0.0.1")) == []
    assert new_members(None, pool_of("10.0.0.1")) == members("10.0.0.1")


def test_compile_board_and_views() -> None:
    from egressgate.config import load_config_text

    cfg = load_config_text(textwrap.dedent("""\
        egress:
          x: {bind: [10.0.0.1], switch: verified, providers: [{name: v, url: "https://v.test/"}]}
          y: {bind: [10.0.0.2]}
        """), FILE)
    b = compile_board(cfg.egress, 10.0, 300.0)
    assert set(b.specs) == {"x"} and b.switch["x"] == "verified" and b.switch["y"] == "immediate"
    assert profile_view(b, pool_of("10.0.0.9")) is not None
    assert profile_view(ProviderBoard(), pool_of("10.0.0.9")) is None
    view = profile_view(b, pool_of("10.0.0.1"))
    assert view["checks"] == [{"member": "10.0.0.1", "provider": "v", "ok": None, "outcome": "unchecked",
                               "detail": "", "role": "active"}]
    table = format_matrix([result("10.0.0.1"), result("10.0.0.2", outcome="reset")]).splitlines()
    assert table[1].split()[:3] == ["x", "10.0.0.1", "v"] and "OK accepted" in table[1]
    assert "FAIL reset" in table[2]


def test_a_bug_in_one_check_cancels_the_rest_of_the_round(monkeypatch) -> None:
    """check() never raises by design; if a bug makes one raise, the round fails at once and the
    other checks of the round are cancelled, not left running with nobody to read them."""
    import asyncio

    from egressgate.services import checks

    started: list[asyncio.Task] = []

    async def fake_check(plan, spec_, reach, guard):
        started.append(asyncio.current_task())
        if plan.source == "127.0.0.2":
            raise RuntimeError("injected")
        await asyncio.sleep(3600)

    monkeypatch.setattr(checks, "check", fake_check)

    async def go() -> None:
        pairs = [(m, spec()) for m in members("127.0.0.2", "127.0.0.3", "127.0.0.4")]
        with pytest.raises(RuntimeError):
            await checks.check_pools({}, board(), None, None, only=pairs)
        await asyncio.sleep(0)
        assert len(started) == 3 and all(t.done() for t in started)

    asyncio.run(go())


# --- judging a provider's answer (shared with block detection from live traffic) -------------
from egressgate.egress.providers import BodyRules, judge_answer, parse_headers  # noqa: E402


@pytest.mark.parametrize(("head", "outcome", "wait"), [
    (b"HTTP/1.1 200 OK", "accepted", None),
    (b"HTTP/1.1 403 Forbidden", "http_status", None),
    (b"HTTP/1.1 429 Too Many Requests", "throttled", None),
    (b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 30", "throttled", 30.0),
    (b"HTTP/1.1 503 Service Unavailable\r\nretry-after:  7 ", "throttled", 7.0),
    (b"HTTP/1.1 503 Service Unavailable", "http_status", None),
    (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 99999999", "throttled", 86400.0),
    (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: soon", "throttled", None),
])
def test_judge_answer(head: bytes, outcome: str, wait: float | None) -> None:
    status = int(head.split()[1])
    got = judge_answer(status, head, lambda s: 200 <= s < 400, "200-399", 1000.0)
    assert (got[0], got[2]) == (outcome, wait), got


def test_parse_headers_and_body_rules() -> None:
    assert parse_headers("# key\n\nX-Api-Key: a:b \nAuthorization: Bearer t\n") == (
        ("X-Api-Key", "a:b"), ("Authorization", "Bearer t"))
    for bad, why in [("secret", "line 1: expected"), ("Host: x", "set by the check"), ("a b: c", "expected")]:
        with pytest.raises(ValueError, match=why) as err:
            parse_headers(bad)
        assert "secret" not in str(err.value)
    assert BodyRules.compile([], None) is None
    rules = BodyRules.compile(["captcha", "Access denied"], r'"ok"')
    assert rules.judge(b'{"ok": true}') is None
    assert "refuse_body 'captcha'" in rules.judge(b"<p>solve this captcha</p> \"ok\"")
    assert "expect_body" in rules.judge(b"{}")
    assert BodyRules.compile(["captcha"], None).judge(b"x" * 70000 + b"captcha") is None  # beyond 64 KiB: not read
