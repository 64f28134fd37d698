"""Standby members and ``switch: auto``, the pure half: the config keys (errors as FILE:LINE:
key), the pool's roles, and ``egress.failover.decide`` on tables of checks (issue 26)."""

from __future__ import annotations

import textwrap

import pytest

from egressgate.config.loader import check_config_text
from egressgate.egress.failover import decide
from egressgate.egress.plan import EgressPlan, build_pool
from egressgate.egress.providers import ProviderResult, compile_board

FILE = "gw.yaml"
PROBE = "probe: {echo_url: 'http://127.0.0.1:9/ip'}\n"


def errors_of(profile: str, extra: str = "") -> list[str]:
    text = "egress:\n  x:\n" + textwrap.indent(textwrap.dedent(profile), "    ") + extra
    return check_config_text(text, FILE).errors


REQUIRED = "providers: [{name: v, url: 'https://v.test/', required: true}]\n"


@pytest.mark.parametrize(("profile", "expected"), [
    ("bind: [127.0.0.2]\nstandby: [127.0.0.2]\n",
     [f"{FILE}:4: egress.x.standby[0]: 127.0.0.2 is also an active member (bind[0]: 127.0.0.2): a member is "
      "active or standby, not both"]),
    ("bind: [10.0.0.0/24]\nstandby:\n  - 10.0.1.1\n  - 10.0.0.9\n",
     [f"{FILE}:6: egress.x.standby[1]: 10.0.0.9 is also an active member (bind[0]: 10.0.0.0/24): a member is "
      "active or standby, not both"]),
    ("bind: [127.0.0.2]\nstandby: [127.0.0.3, 127.0.0.3]\n",
     [f"{FILE}:4: egress.x.standby[1]: 127.0.0.3 overlaps standby[0]"]),
    ("bind: [127.0.0.2]\nstandby: ['http://p:3128']\n",
     [f"{FILE}:4: egress.x.standby[0]: a bind profile's standby members are source addresses or CIDRs, like its "
      "bind entries, not proxy URLs"]),
    ("bind: [127.0.0.2]\nstandby: [nope]\n",
     [f"{FILE}:4: egress.x.standby[0]: not an IP address: 'nope'"]),
    ("upstream: ['http://p:3128']\nstandby: ['http://p:3128/']\n",
     [f"{FILE}:4: egress.x.standby[0]: also an active member (upstream[0]): a member is active or standby, not both"]),
    ("upstream: ['http://p:3128']\nstandby: [127.0.0.3]\n",
     [f"{FILE}:4: egress.x.standby[0]: an upstream profile's standby members are proxy URLs (http://host:port), "
      "like its upstream entries"]),
    ("direct: {}\nstandby: [127.0.0.3]\n",
     [f"{FILE}:4: egress.x.standby: a direct profile has no members to stand by for: standby is for bind "
      "(addresses) and upstream (proxy URLs) profiles"]),
    ("bind: [127.0.0.2]\nstandby: [127.0.0.3]\nswitch: auto\nproviders: [{name: v, url: 'https://v.test/'}]\n",
     [f"{FILE}:5: egress.x.switch: switch: auto fails over when a required provider refuses every active member, "
      "or their egress-IP check fails: mark a provider required: true, or give expect_ip"]),
    ("bind: [127.0.0.2]\nswitch: auto\n" + REQUIRED,
     [f"{FILE}:4: egress.x.switch: switch: auto fails over to a standby member: name standby members (checked "
      "like the active ones, carrying no traffic until then)"]),
    ("bind: [127.0.0.2]\nstandby: [127.0.0.3]\nfailover_after: 3\n",
     [f"{FILE}:5: egress.x.failover_after: only used with switch: auto"]),
    ("bind: [127.0.0.2]\nstandby: [127.0.0.3]\nswitch: auto\nfailover_after: 0\n" + REQUIRED,
     [f"{FILE}:6: egress.x.failover_after: must be at least 1, got 0"]),
])
def test_bad_standby_keys_name_file_line_and_key(profile: str, expected: list[str]) -> None:
    assert errors_of(profile) == expected


def test_good_standby_keys() -> None:
    assert errors_of("bind: [127.0.0.2]\nstandby: [127.0.0.3, 10.9.0.0/24]\nswitch: auto\nfailover_after: 3\n"
                     + REQUIRED) == []
    assert errors_of("bind: [127.0.0.2]\nstandby: [127.0.0.3]\nswitch: auto\nexpect_ip: [192.0.2.1]\n",
                     PROBE) == []
    assert errors_of("upstream: ['http://u@p:3128']\nstandby: ['http://u@q:3128']\n"
                     "upstream_password_env: HOME\nswitch: verified\n" + REQUIRED) == []


def _pool(spec_text: str, extra: str = ""):
    checked = check_config_text("egress:\n  x:\n" + textwrap.indent(spec_text, "    ") + extra, FILE)
    assert not checked.errors, checked.errors
    spec = checked.config.egress["x"]
    pool = build_pool("x", spec, lambda cidr: [], 5.0, lambda: 0.0, attest=bool(checked.config.probe.echo_urls))
    board = compile_board(checked.config.egress, 5.0, 60.0)
    return pool, board


A, B, C = (EgressPlan("x", "bind", source=s) for s in ("127.0.0.2", "127.0.0.3", "127.0.0.4"))
AUTO = "bind: [127.0.0.2]\nstandby: [127.0.0.3, 127.0.0.4]\nswitch: auto\n" + REQUIRED


def _result(member: EgressPlan, outcome: str, at: float = 1.0) -> ProviderResult:
    return ProviderResult("x", member.label, "v", outcome, outcome, at, 403 if outcome == "http_status" else 200)


def test_standby_members_are_checked_but_carry_nothing() -> None:
    pool, board = _pool(AUTO)
    assert pool.members == [A] and pool.standby == [B, C] and pool.everyone == [A, B, C]
    assert [pool.role(m) for m in pool.everyone] == ["active", "standby", "standby"]
    assert [p for p, _ in board.due(pool, 0.0)] == [A, B, C]  # every member is checked
    assert pool.plans("job") == [A] and pool.carrying() == [A]
    assert [row["role"] for row in board.matrix(pool)] == ["active", "standby", "standby"]


@pytest.mark.parametrize(("name", "active", "standby_b", "standby_c", "failover_to"), [
    # every active refused 2 rounds running, a standby accepted: fail over to it
    ("two refusals", ["http_status", "http_status"], ["accepted"], ["accepted"], "127.0.0.3"),
    ("one refusal is not enough", ["http_status"], ["accepted"], ["accepted"], None),
    ("an accept in between resets the count", ["http_status", "accepted", "http_status"], ["accepted"], ["accepted"],
     None),
    ("throttled is no verdict either way", ["http_status", "throttled", "http_status"], ["accepted"], ["accepted"],
     "127.0.0.3"),
    ("the first standby refused too: the next one", ["http_status"] * 2, ["http_status"], ["accepted"], "127.0.0.4"),
    ("every standby refused: no failover", ["http_status"] * 3, ["http_status"], ["body_refused"], None),
    ("a standby never checked is no target", ["http_status"] * 2, [], [], None),
])
def test_failover_decision(name, active, standby_b, standby_c, failover_to) -> None:
    pool, board = _pool(AUTO)
    for outcome in active:
        board.record(_result(A, outcome))
    for member, outcomes in ((B, standby_b), (C, standby_c)):
        for outcome in outcomes:
            board.record(_result(member, outcome))
    decision = decide(board, pool)
    got = decision.failover.to if decision.failover is not None else None
    assert got == failover_to, name
    if failover_to is not None:
        event = decision.failover.event()
        assert event["from"] == ["127.0.0.2"] and event["provider"] == "v" and event["outcome"] == "http_status"
    elif len(active) >= 2 and active[-1] == "http_status" and active[-2] != "accepted":
        assert decision.stranded and "127.0.0.3" in decision.stranded, decision


def test_failover_after_counts_rounds_and_only_auto_fails_over() -> None:
    pool, board = _pool(AUTO.replace("switch: auto", "switch: auto\nfailover_after: 3"))
    board.record(_result(B, "accepted"))
    for _ in range(2):
        board.record(_result(A, "http_status"))
    assert decide(board, pool).failover is None
    board.record(_result(A, "http_status"))
    assert decide(board, pool).failover.to == "127.0.0.3"
    verified, vboard = _pool(AUTO.replace("switch: auto", "switch: verified"))
    vboard.record(_result(B, "accepted"))
    for _ in range(5):
        vboard.record(_result(A, "http_status"))
    assert decide(vboard, verified).failover is None


def test_attestation_failover_does_not_wait_when_the_profile_would_refuse_everything() -> None:
    """An active member exiting from a wrong IP carries nothing (fail closed): a standby that
    passes takes the traffic at once instead of N rounds of 503s."""
    pool, board = _pool("bind: [127.0.0.2]\nstandby: [127.0.0.3]\nswitch: auto\nexpect_ip: [127.0.0.2, 127.0.0.3]\n",
                        PROBE)
    pool.record(A, "127.0.0.2", None, 1.0)
    pool.record(B, "127.0.0.3", None, 1.0)
    assert decide(board, pool).failover is None and pool.plans("job") == [A]
    pool.record(A, "203.0.113.9", None, 2.0)  # the active member's NAT IP changed under it
    assert not pool.healthy
    made = decide(board, pool).failover
    assert made is not None and made.to == "127.0.0.3" and made.trigger == "refusing"
    assert made.evidence[0].outcome == "egress_ip_mismatch"
    pool.relief = B
    assert pool.healthy and pool.plans("job") == [B] and pool.carrying() == [B]
    # the standby's own IP goes wrong: it carries nothing either (fail closed), and the 503 says why
    pool.record(B, "203.0.113.10", None, 3.0)
    assert pool.relief is None and not pool.healthy
    decision = decide(board, pool)
    assert decision.failover is None and "127.0.0.3" in decision.stranded
    pool.stranded = decision.stranded
    reason, detail = pool.refusal()
    assert reason == "egress_ip_mismatch" and "no standby member to fail over to" in detail, detail


def test_a_reload_keeps_standby_results() -> None:
    """A member checked as standby keeps its results when a reload promotes it (same label)."""
    pool, board = _pool(AUTO)
    pool.record(B, "127.0.0.3", None, 1.0)
    board.record(_result(B, "accepted"))
    promoted, new_board = _pool("bind: [127.0.0.3]\nstandby: [127.0.0.2]\nswitch: auto\n" + REQUIRED)
    promoted.adopt(pool)
    new_board.adopt(board, {"x": promoted})
    assert promoted.checks[B].observed == "127.0.0.3"
    assert new_board.result("x", "127.0.0.3", "v").ok


def test_check_config_warns_about_a_standby_address_this_host_lacks() -> None:
    from egressgate.config.lint import bind_not_local

    checked = check_config_text("egress:\n  x:\n    bind: [127.0.0.2]\n    standby: [192.0.2.77, 127.0.0.3]\n", FILE)
    found = bind_not_local(checked.config, ["10.0.0.1"])
    assert [(f.loc, f.message) for f in found] == [
        (("egress", "x", "standby", 0), "192.0.2.77 is not an address of this host: the standby cannot be checked here")]


def test_upstream_standby_members_are_proxies_with_the_profiles_password() -> None:
    import base64

    text = "egress:\n  x:\n    upstream: ['http://u@p:3128']\n    standby: ['http://u@q:3128']\n" \
           "    upstream_password_env: HOME\n"
    spec = check_config_text(text, FILE).config.egress["x"]
    pool = build_pool("x", spec, lambda cidr: [], 5.0, lambda: 0.0, upstream_password="s3cret")
    (standby,) = pool.standby
    assert standby.kind == "upstream" and standby.label == "http://q:3128" and pool.role(standby) == "standby"
    assert standby.upstream.authorization == "Basic " + base64.b64encode(b"u:s3cret").decode()
