"""``egressgate replay``'s pure parts, table-driven: what a record says was decided, what the
candidate decides for it (identity by how it identified, rules, address guard on the recorded
addresses, protect on the recorded timeline), and reading logs (gzip, malformed lines, order)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from egressgate.commands.replay import UsageError, parse_since
from egressgate.commands.replay_core import Outcome, Replayer, recorded
from egressgate.observe.logread import Line, Malformed, merged, parse_time
from egressgate.proxy.build import load_candidate

CONFIG = """
listen: [{address: "127.0.0.1:3128"}]
security: {connect_ports: [443]}
egress:
  default: {direct: {}}
  vx:
    bind: [10.0.1.5, 10.0.1.6]
    protect: [{name: api, destinations: ["api.vendor-x.com"], max_concurrent: 1, max_per_second: 2}]
clients:
  - {name: pw, from: [10.8.0.0/16], username: pw, password_file: /nonexistent, egress: [vx], allow: ["*.vendor-x.com"]}
  - {name: tokens, from: [10.9.0.0/16], kubernetes: {issuer: "https://k", jwks_file: /nonexistent,
     service_accounts: ["batch/*"]}, egress: [default]}
  - {name: anon, from: [10.10.0.0/16], egress: [default], deny: ["*.blocked.example"]}
"""


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "candidate.yaml"
    path.write_text(CONFIG)
    return load_candidate(str(path))


def rec(**fields) -> dict:
    doc = {"ts_unix": 100.0, "end_ts_unix": 100.1, "client_addr": "10.10.0.7", "client": "anon",
           "listener": "127.0.0.1:3128", "method": "CONNECT", "target": "example.com:443", "status": 200,
           "profile": "default", "egress_addr": "10.0.0.9", "upstream_addr": "93.184.216.34", "reason": "",
           "auth": "none", "addresses": ["93.184.216.34"]}
    doc.update(fields)
    return doc


RECORDED = [
    ("tunnel", rec(), "allow"),
    ("origin 403 is the origin's answer", rec(method="GET", target="http://x.com/", status=403), "allow"),
    ("denied", rec(status=403, reason="destination_not_allowed", upstream_addr="-", egress_addr="-"), "deny"),
    ("protect", rec(status=429, reason="egress_rate_limit", upstream_addr="-", egress_addr="10.0.1.5"), "limit"),
    ("client limit", rec(status=429, reason="connection_limit_reached", upstream_addr="-"), "skip"),
    ("bad password", rec(status=407, reason="bad_credentials", upstream_addr="-", client="-"), "skip"),
    ("no credentials", rec(status=407, reason="auth_required", upstream_addr="-", client="-"), "deny"),
    ("unverified egress", rec(status=503, reason="egress_ip_unverified", upstream_addr="-"), "skip"),
    ("head cut short", rec(method="-", target="-", status=408, reason="client_timeout"), "skip"),
    ("whoami", rec(method="GET", target="http://egressgate.whoami/"), "skip"),
    ("upstream failed after the decision", rec(status=502, reason="connection_refused", upstream_addr="-"), "allow"),
]


@pytest.mark.parametrize(("doc", "kind"), [c[1:] for c in RECORDED], ids=[c[0] for c in RECORDED])
def test_what_a_record_says_was_decided(doc, kind):
    assert recorded(doc).kind == kind


DECIDED = [
    # (id, record, expected outcome kind, reason or profile)
    ("anonymous allowed", rec(), "allow", "default"),
    ("anonymous denied by rule", rec(target="a.blocked.example:443"), "deny", "destination_denied"),
    ("port", rec(target="example.com:22"), "deny", "connect_port_not_allowed"),
    ("socks port rule", rec(method="SOCKS5", target="example.com:80"), "allow", "default"),
    ("guard on the recorded addresses", rec(addresses=["10.1.2.3"]), "deny", "destination_ip_prohibited"),
    ("guard on the address dialed", rec(addresses=None, upstream_addr="169.254.169.254"), "deny",
     "destination_ip_prohibited"),
    ("metadata name", rec(method="GET", target="http://metadata/"), "deny", "destination_ip_prohibited"),
    ("address no entry admits", rec(client_addr="192.0.2.1"), "deny", "client_not_allowed"),
    ("password job as recorded", rec(client="pw", client_addr="10.8.1.1", auth="basic",
                                     target="api.vendor-x.com:443"), "allow", "vx"),
    ("password job, rule", rec(client="pw", client_addr="10.8.1.1", auth="basic"), "deny", "destination_not_allowed"),
    ("password job from outside its from", rec(client="pw", client_addr="10.10.1.1", auth="basic"), "deny",
     "unknown_user"),
    ("password entry gone", rec(client="gone", client_addr="10.8.1.1", auth="basic"), "deny", "unknown_user"),
    ("token job", rec(client="batch/sa-1", client_addr="10.9.0.1", auth="token"), "allow", "default"),
    ("token job not listed", rec(client="other/sa", client_addr="10.9.0.1", auth="token"), "deny",
     "service_account_not_allowed"),
    ("profile asked for, not allowed", rec(requested_profile="vx"), "deny", "profile_not_allowed"),
    ("listener gone", rec(listener="0.0.0.0:3128"), "deny", "listener_removed"),
    ("old log without auth: as the entry identifies", rec(auth=None, client="pw", client_addr="10.8.1.1",
                                                         target="x.vendor-x.com:443"), "allow", "vx"),
]


@pytest.mark.parametrize(("doc", "kind", "what"), [c[1:] for c in DECIDED], ids=[c[0] for c in DECIDED])
def test_the_candidate_decides_again(rt, doc, kind, what):
    outcome, _, _ = Replayer(rt).decide(doc)
    assert outcome.kind == kind, outcome
    assert what in (outcome.reason, outcome.profile), outcome


def test_a_sticky_member_is_the_candidates_choice(rt):
    outcome, dest, rule = Replayer(rt).decide(rec(client="pw", client_addr="10.8.1.1", auth="basic",
                                                  target="api.vendor-x.com:443"))
    assert outcome.member in ("10.0.1.5", "10.0.1.6") and dest == "api.vendor-x.com:443" and rule.name == "api"


def line(n: int, start: float, end: float, **fields) -> Line:
    return Line(end, start, rec(ts_unix=start, end_ts_unix=end, **fields), "log", n)


API = {"client": "pw", "client_addr": "10.8.1.1", "auth": "basic", "target": "api.vendor-x.com:443",
       "profile": "vx"}


def test_protect_is_replayed_in_order_of_start(rt):
    """Written in order of end; admitted in order of start: the long tunnel that started first
    holds the one place (max_concurrent 1), so the two short ones inside it are limited; a
    third, after it ended, is admitted."""
    r = Replayer(rt)
    member = r.decide(rec(**API))[0].member
    for ln in (line(2, 101.0, 101.5, egress_addr=member, **API), line(3, 102.0, 102.5, egress_addr=member, **API),
               line(1, 100.0, 105.0, egress_addr=member, **API), line(4, 106.0, 106.1, egress_addr=member, **API)):
        r.feed(ln)
    rep = r.finish()
    assert rep.counts["newly_limited"] == 2
    (group,) = rep.groups.values()
    assert [e["where"] for e in group.examples] == ["log:2", "log:3"]


def test_protect_rate_on_the_recorded_clock(rt):
    r = Replayer(rt)
    member = r.decide(rec(**API))[0].member
    for i in range(5):  # 5 within 5 ms, one after the other (max_concurrent 1 is not reached); burst 2 at 2/s
        r.feed(line(i + 1, 100.0 + i * 0.001, 100.0005 + i * 0.001, egress_addr=member, **API))
    r.feed(line(9, 103.0, 103.01, egress_addr=member, **API))  # tokens again
    assert r.finish().counts["newly_limited"] == 3


def test_since_leaves_out_what_started_before(rt):
    r = Replayer(rt, since=200.0)
    r.feed(line(1, 100.0, 100.1, target="a.blocked.example:443"))
    r.feed(line(2, 200.0, 200.1, target="a.blocked.example:443"))
    rep = r.finish()
    assert rep.records == 1 and rep.counts["newly_denied"] == 1


def test_reading_plain_gzip_malformed_and_merged(tmp_path: Path):
    good = [json.dumps(rec(ts_unix=t, end_ts_unix=t + 0.5)) for t in (1.0, 3.0, 5.0)]
    a = tmp_path / "a.log"
    a.write_text(good[0] + "\n[1, 2]\n" + good[2] + "\n" + '{"client": "x"}\n')
    b = tmp_path / "b.log.1"  # a rotated, gzipped file: told by its bytes, not its name
    b.write_bytes(gzip.compress((good[1] + "\n\n").encode()))
    found: list[Malformed] = []
    got = [(ln.path, ln.line, ln.start) for ln in merged([str(a), str(b)], found.append)]
    assert got == [(str(a), 1, 1.0), (str(b), 1, 3.0), (str(a), 3, 5.0)]
    assert [str(m) for m in found] == [f"{a}:2: not a JSON object", f"{a}:4: no client_addr field"]


def test_times_from_iso_when_unix_fields_are_absent(tmp_path: Path):
    doc = rec(ts="2026-12-01T00:02:07.296Z", duration_ms=1500.0)
    del doc["ts_unix"], doc["end_ts_unix"]
    p = tmp_path / "old.log"
    p.write_text(json.dumps(doc) + "\n")
    (ln,) = list(merged([str(p)], lambda m: None))
    assert ln.start == parse_time("2026-12-01T00:02:07.296Z") and ln.end == pytest.approx(ln.start + 1.5)


@pytest.mark.parametrize(("text", "expected"), [("2h", 1000.0 - 7200), ("90", 90.0), ("1970-01-01T00:01:00Z", 60.0),
                                                ("1970-01-02", 86400.0)])
def test_since_forms(text, expected):
    assert parse_since(text, 1000.0) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["last tuesday", "nan", "inf", "2026-13-01"])
def test_since_refuses_nonsense(text):
    with pytest.raises(UsageError):
        parse_since(text, 0.0)


def test_outcome_words():
    assert Outcome("allow", profile="vx", member="10.0.1.5").describe(member=True) == "allowed via vx (10.0.1.5)"
    assert Outcome("deny", "destination_not_allowed", 403, detail="rule: allow").describe() == \
        "403 destination_not_allowed (rule: allow)"


def test_a_record_longer_than_the_window_is_admitted_late(rt):
    """window 1 s: the short ones are admitted as the log moves on; the tunnel that started first
    but ended 10 s later comes after them and is admitted when it comes (counted as late)."""
    r = Replayer(rt, window=1.0)
    member = r.decide(rec(**API))[0].member
    for ln in (line(2, 101.0, 101.1, egress_addr=member, **API), line(3, 102.0, 102.0, egress_addr=member, **API),
               line(1, 100.0, 110.0, egress_addr=member, **API), line(4, 112.0, 112.1, egress_addr=member, **API)):
        r.feed(ln)
    rep = r.finish()
    # admitted at 102 (the simulated clock then), holding the one place until 110: nothing else overlaps
    assert rep.late == 1 and rep.counts["newly_limited"] == 0


def test_since_from_a_records_iso_ts_is_that_records_ts_unix():
    """--since copied from a record's ``ts`` must include that record: the ISO text parses to the
    very float the access log wrote as ``ts_unix`` (round(start, 3)), not one ulp above it."""
    import random

    from egressgate.model import iso8601, parse_iso8601

    draw = random.Random(31)
    for _ in range(100_000):
        start = 1796450000.0 + draw.random() * 86400
        assert parse_iso8601(iso8601(start)) == round(start, 3), iso8601(start)
