"""Provider checks (egress.*.providers) and verified cutover (switch: verified), against real
loopback providers: an origin that accepts only some source addresses, a TLS origin whose
certificate the test's CA signed (and one signed by a CA nobody trusts), an origin that
resets, one that never answers, a listener nobody accepts on. ``egressgate verify`` prints the
member x provider matrix; the server shows it in /status, /metrics, /readyz, whoami and
``provider_check`` events, and holds back a reload's new member until every provider accepts it."""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import trustme
import yaml

from .conftest import curl
from .peers import (
    Allowlist,
    HTTPPeer,
    Origin,
    QuietHandler,
    ReservedPort,
    base_config,
    open_tunnel,
    raw_exchange,
    wait_for,
)
from .test_status_page import parse_dom, render

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str) -> tuple[int, bytes]:
    try:
        with OPENER.open(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url: str) -> tuple[int, dict]:
    try:
        with OPENER.open(urllib.request.Request(url, method="POST"), timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def allowlist():
    a = Allowlist("127.0.0.2")
    yield a
    a.close()


@pytest.fixture(scope="module")
def untrusted_tls_origin():
    """A TLS origin whose certificate a CA nobody trusts signed."""
    other = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    other.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    o = Origin(tls=ctx)
    yield o
    o.close()


def _matrix_config(origin, tls_origin, untrusted_tls_origin, faulty, blackhole) -> dict:
    fast = {"timeout": "1s"}
    return base_config(egress={"vendor": {"bind": ["127.0.0.2", "127.0.0.3"], "providers": [
        {"name": "only-2", "url": origin.url("/only-from?addr=127.0.0.2"), "accept": [200]},
        {"name": "tls-ok", "url": f"https://localhost:{tls_origin.port}/ping", "accept": ["200-399", 401]},
        {"name": "tls-handshake", "url": f"https://localhost:{tls_origin.port}/", "accept": "tls"},
        {"name": "tls-untrusted", "url": f"https://localhost:{untrusted_tls_origin.port}/", "accept": "tls"},
        {"name": "resets", "url": f"http://127.0.0.1:{faulty.port}/reset-before-head", **fast},
        {"name": "silent", "url": f"http://127.0.0.1:{faulty.port}/silent", **fast},
        {"name": "blackholed", "url": f"http://{blackhole.address}/", **fast},
    ]}})


def _verify(path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "egressgate", "verify", "--config", str(path), *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def test_verify_classifies_each_member_and_provider(tmp_path, origin, tls_origin, untrusted_tls_origin, faulty,
                                                    blackhole, ca_file):
    path = tmp_path / "candidate.yaml"
    path.write_text(yaml.safe_dump(_matrix_config(origin, tls_origin, untrusted_tls_origin, faulty, blackhole)))
    r = _verify(path, "--json", env={"SSL_CERT_FILE": ca_file})
    assert r.returncode == 1, r.stdout + r.stderr
    got = {(d["member"], d["provider"]): d for d in map(json.loads, r.stdout.splitlines())}
    assert len(got) == 14
    for d in got.values():  # times both ways (issue 29 item 5): Unix seconds and ISO 8601 beside
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", d["at_iso"]) and isinstance(d["at"], float)
    for member in ("127.0.0.2", "127.0.0.3"):
        # the origin sees each member's own source address: only 127.0.0.2 is allowlisted
        only = got[(member, "only-2")]
        assert only["egress_addr"] == member and only["remote_addr"] == f"127.0.0.1:{origin.port}"
        # real TLS, SNI localhost, verified against the test's CA
        assert got[(member, "tls-ok")]["outcome"] == "accepted" and got[(member, "tls-ok")]["status"] == 200
        assert got[(member, "tls-handshake")]["outcome"] == "accepted"
        assert "TLS handshake OK" in got[(member, "tls-handshake")]["detail"]
        bad = got[(member, "tls-untrusted")]
        assert bad["outcome"] == "tls_error" and "certificate verify failed" in bad["detail"], bad
        assert got[(member, "resets")]["outcome"] == "reset", got[(member, "resets")]
        assert got[(member, "silent")]["outcome"] == "no_response", got[(member, "silent")]
        assert got[(member, "blackholed")]["outcome"] == "connect_timeout", got[(member, "blackholed")]
        for d in got.values():
            assert d["at"] > 0 and d["detail"]
    assert got[("127.0.0.2", "only-2")]["outcome"] == "accepted"
    refused = got[("127.0.0.3", "only-2")]
    assert refused["outcome"] == "http_status" and refused["status"] == 403
    assert "HTTP/1.0 403" in refused["detail"] or "HTTP/1.1 403" in refused["detail"], refused
    # the table, and the filters: one provider that every member passes exits 0
    table = _verify(path, "--provider", "tls-ok", env={"SSL_CERT_FILE": ca_file})
    assert table.returncode == 0, table.stdout + table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["PROFILE", "MEMBER", "PROVIDER", "EGRESS", "RESULT"] and len(lines) == 3
    assert all("OK accepted" in line for line in lines[1:])
    # without the test's CA the same origin fails verification: the check really verifies
    plain = _verify(path, "--provider", "tls-ok", env={"SSL_CERT_FILE": "/nonexistent"})
    assert plain.returncode == 1 and "FAIL tls_error" in plain.stdout, plain.stdout
    assert _verify(path, "--provider", "nope").returncode == 2


def test_verify_since_checks_only_new_members(tmp_path, origin):
    current = base_config(egress={"vendor": {"bind": ["127.0.0.2"], "providers": [
        {"name": "only-2", "url": origin.url("/only-from?addr=127.0.0.2")}]}})
    candidate = base_config(egress={"vendor": {"bind": ["127.0.0.2", "127.0.0.3"], "providers": [
        {"name": "only-2", "url": origin.url("/only-from?addr=127.0.0.2")}]}})
    (tmp_path / "current.yaml").write_text(yaml.safe_dump(current))
    (tmp_path / "candidate.yaml").write_text(yaml.safe_dump(candidate))
    r = _verify(tmp_path / "candidate.yaml", "--since", str(tmp_path / "current.yaml"))
    assert r.returncode == 1, r.stdout + r.stderr
    rows = r.stdout.splitlines()[1:]
    assert len(rows) == 1 and "127.0.0.3" in rows[0] and "FAIL http_status" in rows[0] and "403" in rows[0]
    assert _verify(tmp_path / "current.yaml", "--since", str(tmp_path / "current.yaml")).returncode == 0


def test_server_shows_the_matrix(start_gateway, origin, faulty, tls_origin, untrusted_tls_origin, ca_file, tmp_path):
    cfg = base_config(egress={"vendor": {"bind": ["127.0.0.2", "127.0.0.3"], "providers": [
        {"name": "only-2", "url": origin.url("/only-from?addr=127.0.0.2"), "required": True},
        {"name": "resets", "url": f"http://127.0.0.1:{faulty.port}/reset-before-head"},
        {"name": "tls-ok", "url": f"https://localhost:{tls_origin.port}/ping"},
        {"name": "tls-untrusted", "url": f"https://localhost:{untrusted_tls_origin.port}/", "accept": "tls"}]}},
        clients=[{"name": "job", "from": ["127.0.0.0/8"], "egress": ["vendor"], "allow": [f"127.0.0.1:{origin.port}"]}])
    gw = start_gateway(cfg, env={"SSL_CERT_FILE": ca_file})  # the server's checks trust the test's CA
    event = gw.wait_event("provider_check")
    assert {"profile", "member", "provider", "ok", "outcome", "detail", "egress_addr"} <= set(event)

    def matrix():
        doc = json.loads(_get(gw.admin + "/status")[1])["profiles"]["vendor"]["providers"]
        checks = {(c["member"], c["provider"]): c for c in doc["checks"]}
        return checks if all(c["ok"] is not None for c in checks.values()) else None

    checks = wait_for(matrix, "every member x provider checked")
    assert checks[("127.0.0.2", "only-2")]["ok"] is True
    assert checks[("127.0.0.3", "only-2")]["outcome"] == "http_status" and checks[("127.0.0.3", "only-2")]["status"] == 403
    assert checks[("127.0.0.2", "resets")]["outcome"] == "reset"
    assert checks[("127.0.0.3", "tls-ok")]["outcome"] == "accepted"  # real TLS in the server's own loop
    untrusted = checks[("127.0.0.3", "tls-untrusted")]
    assert untrusted["outcome"] == "tls_error" and "certificate verify failed" in untrusted["detail"], untrusted
    metrics = _get(gw.admin + "/metrics")[1].decode()
    assert 'egressgate_provider_reachable{member="127.0.0.2",profile="vendor",provider="only-2"} 1.0' in metrics
    assert 'egressgate_provider_reachable{member="127.0.0.3",profile="vendor",provider="only-2"} 0.0' in metrics
    assert 'egressgate_provider_last_check_timestamp_seconds{member="127.0.0.3",profile="vendor",provider="only-2"}' \
        in metrics
    # only-2 is required and refuses 127.0.0.3: the profile's readiness names both (the
    # instance stays ready: see test_a_required_provider_never_evicts_the_instance)
    status, body = _get(gw.admin + "/readyz")
    assert status == 200 and b"provider only-2 refuses 127.0.0.3" in body, body
    # the job's own pre-flight: whoami shows its profile's providers and their results
    resp = raw_exchange(gw.address, b"GET http://egressgate.whoami/ HTTP/1.1\r\nX-Egressgate-Profile: vendor\r\n\r\n",
                        read_until_close=False)
    doc = json.loads(resp.partition(b"\r\n\r\n")[2])
    seen = {(c["member"], c["provider"]): c["ok"] for c in doc["providers"]["checks"]}
    assert seen[("127.0.0.2", "only-2")] is True and seen[("127.0.0.3", "only-2")] is False
    # ... and whether the job's own destination rules let it reach each provider at all
    reach = {p["name"]: (p["allowed"], p["denied_because"]) for p in doc["providers"]["providers"]}
    assert reach["only-2"] == (True, None)
    assert reach["resets"][0] is False and reach["resets"][1].startswith("destination_not_allowed")
    # the status page draws the matrix, red and green
    dom = parse_dom(render(gw.admin + "/", tmp_path))
    rows = {(r[1].text, r[2].text): r for r in dom.tables["providers"]}
    assert (rows[("127.0.0.2", "only-2")][3].text, rows[("127.0.0.2", "only-2")][3].cls) == ("OK", "ok")
    refused = rows[("127.0.0.3", "only-2")]
    assert (refused[3].text, refused[3].cls) == ("FAIL http_status", "bad") and "403" in refused[4].text
    assert rows[("127.0.0.2", "resets")][3].text == "FAIL reset"


def _cutover_config(allowlist, echo_port: int, bind: str, **profile) -> dict:
    return base_config(
        egress={"vendor": {"bind": [bind], "switch": "verified",
                           "providers": [{"name": "vendor-api", "url": allowlist.url, "interval": "0.3s"}],
                           **profile}},
        clients=[{"name": "job", "from": ["127.0.0.0/8"], "egress": ["vendor"]}],
        security={"connect_ports": [443, echo_port], "allow_private": ["127.0.0.0/8"]},
    )


def _roundtrip(s: socket.socket, data: bytes) -> None:
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(65536)
        assert chunk, got
        got += chunk
    assert got == data


def _reload_to(gw, cfg: dict) -> tuple[int, dict]:
    cfg = {**cfg, "listen": [{"address": gw.address}], "admin": {"address": gw.admin.removeprefix("http://")}}
    gw.write_config(cfg)
    return _post(gw.admin + "/-/reload")


def _ip(gw, origin) -> bytes:
    return curl("-x", gw.url, origin.url("/ip")).stdout


@pytest.mark.parametrize("attested", [False, True], ids=["plain", "with-expect_ip"])
def test_verified_cutover_refused_keeps_old_address_and_tunnel(start_gateway, allowlist, echo, origin, attested):
    """With expect_ip too, the switch the gateway makes by itself lands on an attested member
    (never a burst of 503s from a profile whose new member nobody probed)."""
    extra = {"expect_ip": ["127.0.0.2", "127.0.0.3"]} if attested else {}

    def config(bind: str) -> dict:
        cfg = _cutover_config(allowlist, echo.port, bind, **extra)
        if attested:
            cfg["probe"] = {"echo_url": origin.url("/ip")}
        return cfg

    gw = start_gateway(config("127.0.0.2"))
    assert _ip(gw, origin) == b"127.0.0.2"
    s = open_tunnel(gw, f"127.0.0.1:{echo.port}", timeout=30)
    _roundtrip(s, b"before" * 1000)
    # the new address is not on the provider's allowlist: the reload keeps the old member
    status, doc = _reload_to(gw, config("127.0.0.3"))
    assert status == 200 and doc["reloaded"] is True
    why = doc["pending_switches"]["vendor"]
    assert "vendor-api" in why and "127.0.0.3" in why and "403" in why, why
    event = gw.wait_event("provider_switch")
    assert event["state"] == "pending" and event["new_members"] == ["127.0.0.3"]
    assert _ip(gw, origin) == b"127.0.0.2"  # new connections still leave from the old address
    kept = json.loads(_get(gw.admin + "/status")[1])["profiles"]["vendor"]
    assert kept["members"] == ["127.0.0.2"]
    assert [(c["member"], c["ok"]) for c in kept["providers"]["checks"]] == [("127.0.0.2", True)]  # results kept
    _roundtrip(s, b"during" * 1000)  # the open tunnel keeps running
    metrics = _get(gw.admin + "/metrics")[1].decode()
    assert 'egressgate_provider_switch_pending{profile="vendor"} 1.0' in metrics
    pending = json.loads(_get(gw.admin + "/status")[1])["profiles"]["vendor"]["providers"]["pending_switch"]
    assert pending["new_members"] == ["127.0.0.3"] and pending["refused_by"][0]["status"] == 403
    # the provider allowlists the new address: the gateway switches by itself at the next check
    after = len(gw.events)
    allowlist.allowed.add("127.0.0.3")
    done = gw.wait_event("provider_switch", after=after)
    assert done["state"] == "done" and done["new_members"] == ["127.0.0.3"]
    assert _ip(gw, origin) == b"127.0.0.3"
    if attested:
        profile = json.loads(_get(gw.admin + "/status")[1])["profiles"]["vendor"]
        assert profile["serving"] is True and profile["observed_ip"] == "127.0.0.3", profile
    _roundtrip(s, b"after" * 1000)  # and the tunnel from the old address still was not cut
    s.close()
    wait_for(lambda: 'egressgate_provider_switch_pending{profile="vendor"} 0.0'
             in _get(gw.admin + "/metrics")[1].decode(), "the pending gauge cleared")


def test_a_pending_switch_cancelled_by_a_reload_says_so(start_gateway, allowlist, echo, origin):
    """Defect (issue 29 item 6): a reload that reverted (or replaced) a pending verified switch
    left no event: the switch just vanished."""
    gw = start_gateway(_cutover_config(allowlist, echo.port, "127.0.0.2"))
    status, doc = _reload_to(gw, _cutover_config(allowlist, echo.port, "127.0.0.3"))
    assert status == 200 and "vendor" in doc["pending_switches"], doc
    gw.wait_event("provider_switch")
    after = len(gw.events)
    status, doc = _reload_to(gw, _cutover_config(allowlist, echo.port, "127.0.0.2"))  # revert
    assert status == 200 and "pending_switches" not in doc, doc
    event = gw.wait_event("provider_switch", after=after)
    assert (event["state"], event["new_members"], event["old_members"]) == ("cancelled", ["127.0.0.3"], ["127.0.0.2"])
    assert event["reason"].startswith("reverted"), event
    profile = json.loads(_get(gw.admin + "/status")[1])["profiles"]["vendor"]
    assert profile["providers"]["pending_switch"] is None
    # pending again, then replaced by a switch to yet another refused member
    _reload_to(gw, _cutover_config(allowlist, echo.port, "127.0.0.3"))
    after = len(gw.events)
    _reload_to(gw, _cutover_config(allowlist, echo.port, "127.0.0.4"))
    wait_for(lambda: len([e for e in gw.events[after:] if e.get("event") == "provider_switch"]) >= 2,
             "the pending and the cancelled events")
    events = [e for e in gw.events[after:] if e.get("event") == "provider_switch"]
    cancelled = next(e for e in events if e["state"] == "cancelled")
    assert cancelled["new_members"] == ["127.0.0.3"] and "127.0.0.4" in cancelled["reason"], cancelled


def test_the_status_page_lists_the_pending_member_in_the_providers_table(start_gateway, allowlist, echo, tmp_path):
    """Defect (issue 29 item 6): the member a verified switch waits for appeared only in the
    banner, not in the providers table."""
    from .test_status_page import parse_dom, render

    gw = start_gateway(_cutover_config(allowlist, echo.port, "127.0.0.2"))
    status, doc = _reload_to(gw, _cutover_config(allowlist, echo.port, "127.0.0.3"))
    assert status == 200 and "vendor" in doc["pending_switches"], doc
    rows = parse_dom(render(gw.admin + "/", tmp_path)).tables["providers"]
    cells = {row[1].text: row for row in rows}
    assert cells["127.0.0.2"][3].text == "OK"
    pending = cells["127.0.0.3 (pending)"]
    assert pending[3].text.startswith("FAIL") and pending[3].cls == "bad", [c.text for c in pending]


def test_verified_cutover_succeeds_when_the_provider_accepts(start_gateway, allowlist, echo, origin):
    allowlist.allowed.add("127.0.0.5")
    gw = start_gateway(_cutover_config(allowlist, echo.port, "127.0.0.2"))
    assert _ip(gw, origin) == b"127.0.0.2"
    status, doc = _reload_to(gw, _cutover_config(allowlist, echo.port, "127.0.0.5"))
    assert status == 200 and "pending_switches" not in doc, doc
    event = gw.wait_event("provider_switch")
    assert event["state"] == "done" and event["new_members"] == ["127.0.0.5"]
    assert _ip(gw, origin) == b"127.0.0.5"


def test_immediate_switch_is_unchanged(start_gateway, allowlist, echo, origin):
    """Without switch: verified a reload moves at once, accepted or not (the check only reports)."""
    gw = start_gateway(_cutover_config(allowlist, echo.port, "127.0.0.2", switch="immediate"))
    status, doc = _reload_to(gw, _cutover_config(allowlist, echo.port, "127.0.0.3", switch="immediate"))
    assert status == 200 and "pending_switches" not in doc
    assert _ip(gw, origin) == b"127.0.0.3"


def test_verify_through_a_chained_proxy_and_the_gateways_own_refusals(start_gateway, tmp_path, origin, tls_origin,
                                                                      ca_file):
    """An upstream member is checked through its chained proxy (here a second gateway leaving
    from 127.0.0.4), TLS end to end through the CONNECT; a bind address this host lacks and a
    provider the address guard refuses are the gateway's own failures, each named."""
    hop = start_gateway(base_config(egress={"default": {"bind": ["127.0.0.4"]}},
                                    security={"connect_ports": [443, origin.port, tls_origin.port]}))
    providers = [{"name": "only-4", "url": origin.url("/only-from?addr=127.0.0.4")},
                 {"name": "tls-ok", "url": f"https://localhost:{tls_origin.port}/ping"}]
    cfg = base_config(egress={"chained": {"upstream": [hop.url], "providers": providers},
                              "absent": {"bind": ["192.0.2.77"], "providers": providers[:1]}})
    path = tmp_path / "chained.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = _verify(path, "--json", env={"SSL_CERT_FILE": ca_file})
    got = {(d["profile"], d["provider"]): d for d in map(json.loads, r.stdout.splitlines())}
    assert r.returncode == 1, r.stdout + r.stderr
    only = got[("chained", "only-4")]
    assert only["outcome"] == "accepted", only  # the provider saw the chained proxy's source address
    assert only["member"] == only["egress_addr"] == hop.url, only  # (the member is the chained proxy)
    assert got[("chained", "tls-ok")]["outcome"] == "accepted", got[("chained", "tls-ok")]
    absent = got[("absent", "only-4")]
    assert absent["outcome"] == "source_unavailable" and "192.0.2.77" in absent["detail"], absent
    # without security.allow_private the loopback provider is refused by the address guard, as a job's
    # request would be: the check never connects
    del cfg["security"]["allow_private"]
    cfg["egress"] = {"direct-ish": {"bind": ["127.0.0.2"], "providers": providers[:1]}}
    path.write_text(yaml.safe_dump(cfg))
    guarded = _verify(path, "--json")
    (d,) = map(json.loads, guarded.stdout.splitlines())
    assert guarded.returncode == 1 and d["outcome"] == "address_prohibited" and "loopback" in d["detail"], d


def test_failing_checks_leak_nothing(start_gateway, origin, faulty, blackhole, untrusted_tls_origin):
    """Round after round of checks that end in a reset, a timeout, a TLS failure, a 403 and a
    connect that never completes: the gateway's descriptors do not grow."""
    fast = {"timeout": "0.3s", "interval": "0.2s"}
    gw = start_gateway(base_config(egress={"vendor": {"bind": ["127.0.0.3"], "providers": [
        {"name": "only-2", "url": origin.url("/only-from?addr=127.0.0.2"), **fast},
        {"name": "resets", "url": f"http://127.0.0.1:{faulty.port}/reset-before-head", **fast},
        {"name": "silent", "url": f"http://127.0.0.1:{faulty.port}/silent", **fast},
        {"name": "blackholed", "url": f"http://{blackhole.address}/", **fast},
        {"name": "tls-untrusted", "url": f"https://localhost:{untrusted_tls_origin.port}/", "accept": "tls", **fast},
    ]}}))

    def rounds() -> int:
        return sum(1 for e in list(gw.events) if e.get("event") == "provider_check" and e["provider"] == "silent")

    def lowest_fds_until(n: int) -> int:
        """The fewest descriptors seen while waiting for round ``n`` (checks in flight hold some:
        the low point is the state between rounds, what a leak would raise round after round)."""
        seen: list[int] = []
        wait_for(lambda: seen.append(gw.fd_count()) or rounds() >= n, f"{n} rounds of checks", timeout=30)
        return min(seen)

    lowest_fds_until(2)
    before = lowest_fds_until(4)
    after = lowest_fds_until(10)
    outcomes = {e["provider"]: e["outcome"] for e in list(gw.events) if e.get("event") == "provider_check"}
    assert outcomes == {"only-2": "http_status", "resets": "reset", "silent": "no_response",
                        "blackholed": "connect_timeout", "tls-untrusted": "tls_error"}
    assert after <= before + 1, f"descriptors grew from {before} to {after} over six rounds"
    assert not [e for e in gw.events if e.get("event") == "internal_error"]


def test_two_workers_each_check_and_the_instance_reports_once(start_gateway, allowlist):
    """Every worker checks for itself (each decides alone about a verified switch); /metrics
    shows worker 0's result (1, not the sum 2) and only worker 0 logs provider_check events."""
    with ReservedPort() as port:
        gw = start_gateway(base_config(listen=[{"address": port.address}], workers=2, egress={
            "vendor": {"bind": ["127.0.0.2"], "providers": [{"name": "vendor-api", "url": allowlist.url}]}}))
        wait_for(lambda: len([e for e in gw.events if e.get("event") == "started"]) >= 2, "both workers started")
    wait_for(lambda: len(allowlist.hits) >= 2, "a check from each worker")
    assert allowlist.hits[:2] == ["127.0.0.2", "127.0.0.2"]
    line = 'egressgate_provider_reachable{member="127.0.0.2",profile="vendor",provider="vendor-api"}'
    metric = wait_for(lambda: next((ln for ln in _get(gw.admin + "/metrics")[1].decode().splitlines()
                                    if ln.startswith(line)), None), "the merged gauge")
    assert metric.endswith(" 1.0"), metric
    wait_for(lambda: [e for e in gw.events if e.get("event") == "provider_check"], "worker 0's provider_check event")
    assert len([e for e in gw.events if e.get("event") == "provider_check"]) == 1


def _slip_config(allowlist, echo_port: int, origin, bind: str, expect: list[str], **profile) -> dict:
    cfg = _cutover_config(allowlist, echo_port, bind, expect_ip=expect, **profile)
    cfg["probe"] = {"echo_url": origin.url("/ip"), "interval": "0.3s", "retry": "0.3s"}
    return cfg


def test_verified_switch_waits_for_the_egress_ip_attestation_too(start_gateway, allowlist, echo, origin):
    """Defect (issue 26 item 1): a profile moved to bind [B] with expect_ip [A] (a slip) and a
    provider accepting B: the reload answered reloaded with no pending switch, the
    provider_switch event said done and every job got 503 Egress IP Mismatch, while the old
    member was attested and accepted. A verified switch needs the attestation AND every provider."""
    allowlist.allowed.update({"127.0.0.2", "127.0.0.3"})
    gw = start_gateway(_slip_config(allowlist, echo.port, origin, "127.0.0.2", ["127.0.0.2"]))
    assert _ip(gw, origin) == b"127.0.0.2"
    s = open_tunnel(gw, f"127.0.0.1:{echo.port}", timeout=30)
    _roundtrip(s, b"before" * 1000)
    status, doc = _reload_to(gw, _slip_config(allowlist, echo.port, origin, "127.0.0.3", ["127.0.0.2"]))
    assert status == 200 and doc["reloaded"] is True
    why = doc["pending_switches"]["vendor"]
    assert "127.0.0.3" in why and "egress_ip_mismatch" in why, why
    event = gw.wait_event("provider_switch")
    assert event["state"] == "pending" and event["new_members"] == ["127.0.0.3"], event
    assert "egress_ip_mismatch" in event["reason"], event
    assert _ip(gw, origin) == b"127.0.0.2"  # the old, attested and accepted member keeps serving
    profile = json.loads(_get(gw.admin + "/status")[1])["profiles"]["vendor"]
    assert profile["serving"] is True and profile["members"] == ["127.0.0.2"], profile
    _roundtrip(s, b"during" * 1000)
    # the slip is not fixed by itself: the switch stays pending over later checks
    def refused_at() -> float:
        pending = json.loads(_get(gw.admin + "/status")[1])["profiles"]["vendor"]["providers"]["pending_switch"]
        return pending["refused_by"][0]["at"]

    first = refused_at()
    wait_for(lambda: refused_at() > first, "a later check of the pending member")
    assert _ip(gw, origin) == b"127.0.0.2"
    # a member seen leaving from a wrong IP is never shown to the provider, not even by a check
    assert "127.0.0.3" not in allowlist.hits, allowlist.hits
    checks = json.loads(_get(gw.admin + "/status")[1])["profiles"]["vendor"]["providers"]["pending_switch"]
    assert any("leaves from" in f["detail"] and f["outcome"] == "throttled" for f in checks["refused_by"]), checks
    # the config is corrected: the switch happens, attested and accepted
    status, doc = _reload_to(gw, _slip_config(allowlist, echo.port, origin, "127.0.0.3", ["127.0.0.3"]))
    assert status == 200 and "pending_switches" not in doc and "refusing" not in doc, doc
    assert _ip(gw, origin) == b"127.0.0.3"
    _roundtrip(s, b"after" * 1000)
    s.close()


def test_a_reload_that_leaves_a_profile_refusing_all_traffic_says_so(start_gateway, allowlist, echo, origin):
    """Defect (issue 26 item 1): a reload whose result made a profile refuse all its traffic
    answered a plain ``reloaded: true`` and its event said nothing."""
    allowlist.allowed.update({"127.0.0.2", "127.0.0.3"})
    gw = start_gateway(_slip_config(allowlist, echo.port, origin, "127.0.0.2", ["127.0.0.2"], switch="immediate"))
    assert _ip(gw, origin) == b"127.0.0.2"
    after = len(gw.events)
    status, doc = _reload_to(gw, _slip_config(allowlist, echo.port, origin, "127.0.0.3", ["127.0.0.2"],
                                              switch="immediate"))
    assert status == 200 and doc["reloaded"] is True
    assert "egress IP 127.0.0.3" in doc["refusing"]["vendor"], doc
    event = gw.wait_event("reloaded", after=after)
    assert "127.0.0.3" in event["refusing"]["vendor"], event


class Throttler(HTTPPeer):
    """A provider that rate-limits: 429 with Retry-After (seconds), 503 with an HTTP-date
    Retry-After, 503 without one (an outage, not a throttle), by path."""

    def __init__(self) -> None:
        self.ok_hits = 0
        owner = self

        class Handler(QuietHandler):
            def do_HEAD(self) -> None:
                if self.path == "/ok":
                    owner.ok_hits += 1
                    self.send_response(200)
                elif self.path == "/429":
                    self.send_response(429)
                    self.send_header("Retry-After", "120")
                elif self.path == "/503-date":
                    self.send_response(503)
                    self.send_header("Retry-After", "Fri, 31 Dec 2100 23:59:59 GMT")
                else:
                    self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD

        super().__init__(Handler)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def throttler():
    t = Throttler()
    yield t
    t.close()


def test_throttling_is_not_a_block(tmp_path, start_gateway, throttler):
    """Defect (issue 26 item 3): a 429 (or 503 with Retry-After) was reported as http_status like
    a 403 allowlist refusal: it failed a required check (readiness) and the pre-flight as
    "refuses member". Now: outcome throttled, with the Retry-After, never a refusal."""
    cfg = base_config(egress={"vendor": {"bind": ["127.0.0.2"], "providers": [
        {"name": "limited", "url": throttler.url("/429"), "required": True},
        {"name": "limited-until", "url": throttler.url("/503-date"), "required": True}]}})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = _verify(path, "--json")
    got = {d["provider"]: d for d in map(json.loads, r.stdout.splitlines())}
    assert got["limited"]["outcome"] == "throttled" and got["limited"]["retry_after"] == 120, got
    assert got["limited-until"]["outcome"] == "throttled" and got["limited-until"]["retry_after"] > 86000, got
    assert r.returncode == 3, r.stdout + r.stderr  # no verdict: neither pass (0) nor refusal (1)
    gw = start_gateway(cfg)
    wait_for(lambda: all(c["outcome"] == "throttled" for c in json.loads(_get(gw.admin + "/status")[1])
                         ["profiles"]["vendor"]["providers"]["checks"]) and len(json.loads(
                             _get(gw.admin + "/status")[1])["profiles"]["vendor"]["providers"]["checks"]) == 2,
             "both checks made")
    status, body = _get(gw.admin + "/readyz")
    assert status == 200, body
    # a 503 without Retry-After is an outage answer, judged as before
    cfg["egress"]["vendor"]["providers"] = [{"name": "down", "url": throttler.url("/503")}]
    path.write_text(yaml.safe_dump(cfg))
    r = _verify(path, "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["outcome"] == "http_status", r.stdout


def test_checks_respect_the_gateways_own_protect_holds(start_gateway, throttler):
    """Defect (issue 26 item 3): a provider check went out through a member the gateway was
    holding for that host (the origin had answered a job 429 with Retry-After)."""
    cfg = base_config(
        egress={"vendor": {"bind": ["127.0.0.2"],
                           "protect": [{"name": "api", "destinations": ["127.0.0.1"], "max_hold": "300s"}],
                           "providers": [{"name": "api", "url": throttler.url("/ok"), "interval": "0.3s"}]}},
        clients=[{"name": "job", "from": ["127.0.0.0/8"], "egress": ["vendor"]}],
        security={"allow_private": ["127.0.0.0/8"]})
    gw = start_gateway(cfg)

    def check() -> dict:
        return json.loads(_get(gw.admin + "/status")[1])["profiles"]["vendor"]["providers"]["checks"][0]

    wait_for(lambda: check()["outcome"] == "accepted", "the first check")
    r = curl("-x", gw.url, "-w", "%{http_code}", throttler.url("/429"))  # the origin asks a job to wait 120 s
    assert r.stdout.endswith(b"429"), r
    wait_for(lambda: json.loads(_get(gw.admin + "/status")[1])["profiles"]["vendor"]["protect"]["holds"],
             "the gateway's hold")
    wait_for(lambda: check()["outcome"] == "throttled", "a check that respects the hold")
    hits = throttler.ok_hits
    got = check()
    assert "holds 127.0.0.2 for 127.0.0.1" in got["detail"] and 100 < got["retry_after"] <= 120, got
    first = got["at"]
    wait_for(lambda: check()["at"] > first, "a later check")
    assert throttler.ok_hits == hits  # nothing went out through the held member
    status, body = _get(gw.admin + "/readyz")
    assert status == 200, body


def test_a_required_provider_never_evicts_the_instance(start_gateway, origin):
    """Defect (issue 26 item 2): a required provider refusing one member of one profile took the
    whole instance out of readiness -- every replica shares the egress IPs, so one block emptied
    the Service. Now the profile steers new connections to the members it accepts, and the
    instance stays ready; /readyz names the refusal under the profile."""
    cfg = base_config(egress={"vendor": {"bind": ["127.0.0.2", "127.0.0.3"], "pick": "round_robin", "providers": [
        {"name": "only-2", "url": origin.url("/only-from?addr=127.0.0.2"), "required": True, "interval": "0.3s"}]}},
        clients=[{"name": "job", "from": ["127.0.0.0/8"], "egress": ["vendor"]}],
        security={"allow_private": ["127.0.0.0/8"]})
    gw = start_gateway(cfg)

    def profile() -> dict:
        return json.loads(_get(gw.admin + "/readyz")[1])["profiles"]["vendor"]

    wait_for(lambda: any("only-2 refuses 127.0.0.3" in p for p in profile()["providers"]), "the refusal")
    status, body = _get(gw.admin + "/readyz")
    assert status == 200 and json.loads(body)["ready"] is True, body
    assert {_ip(gw, origin) for _ in range(6)} == {b"127.0.0.2"}  # round robin skips the refused member


class KeyedProvider(HTTPPeer):
    """A provider that wants an API key (401 without it) and serves a CAPTCHA page with 200 to
    one source address (127.0.0.3), a real answer to the others."""

    def __init__(self) -> None:
        self.keys: list[str | None] = []
        owner = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                owner.keys.append(self.headers.get("X-Api-Key"))
                if self.headers.get("X-Api-Key") != "k3y":
                    status, body = 401, b"no key"
                elif self.client_address[0] == "127.0.0.3":
                    status, body = 200, b"<html><title>Attention Required! | Cloudflare</title>captcha</html>"
                else:
                    status, body = 200, b'{"pong": true}'
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(Handler)
        self.url = f"http://127.0.0.1:{self.port}/ping"


def test_checks_send_api_keys_and_recognise_a_block_page(tmp_path):
    """Issue 26 item 4: request headers from a file or env (API keys), and a body match, so a
    200 block page or CAPTCHA is recognised as a refusal (before: 200 = accepted)."""
    provider = KeyedProvider()
    try:
        (tmp_path / "headers").write_text("# the vendor's key\nX-Api-Key: k3y\n")
        cfg = base_config(egress={"vendor": {"bind": ["127.0.0.2", "127.0.0.3"], "providers": [
            {"name": "from-file", "url": provider.url, "method": "GET", "headers_file": str(tmp_path / "headers"),
             "refuse_body": ["Attention Required"]},
            {"name": "from-env", "url": provider.url, "method": "GET", "headers_env": "VENDOR_HEADERS",
             "expect_body": '"pong"'},
            {"name": "no-key", "url": provider.url, "method": "GET"}]}})
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(cfg))
        r = _verify(path, "--json", env={"VENDOR_HEADERS": "X-Api-Key: k3y"})
        got = {(d["member"], d["provider"]): d for d in map(json.loads, r.stdout.splitlines())}
        assert r.returncode == 1 and len(got) == 6, r.stdout + r.stderr
        for provider_name in ("from-file", "from-env"):
            assert got[("127.0.0.2", provider_name)]["outcome"] == "accepted", got
            blocked = got[("127.0.0.3", provider_name)]
            assert blocked["outcome"] == "body_refused" and blocked["status"] == 200, blocked
        assert "Attention Required" in got[("127.0.0.3", "from-file")]["detail"]
        assert got[("127.0.0.2", "no-key")]["status"] == 401
        assert "k3y" not in r.stdout + r.stderr  # the key is never shown
        # a headers file that is not headers: a config error naming the line, not the value
        (tmp_path / "headers").write_text("k3y\n")
        bad = _verify(path, "--json", env={"VENDOR_HEADERS": "X-Api-Key: k3y"})
        assert bad.returncode == 1 and not bad.stdout and "line 1: expected 'Name: value'" in bad.stderr and "k3y" not in bad.stderr, \
            bad.stderr
    finally:
        provider.close()
