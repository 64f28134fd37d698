"""Job receipts' pure parts: the per-identity tallies (what counts as what, the bounds: hosts
folded into "(other)", buckets merged, idle identities expired, the idlest evicted, ``since``),
adding workers' exports up, and the Ed25519 signature (canonical form, tampering, pinning)."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from egressgate.model import AccessRecord
from egressgate.observe import receipt as signing
from egressgate.observe.tally import MAX_BUCKETS, OTHER, Tallies, merge
from egressgate.policy.clients import ClientPolicy, Identity
from egressgate.policy.tokens import TokenSubject
from egressgate.proxy.whoami import receipt_query


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def rec(client="job", method="CONNECT", target="api.example.com:443", upstream="93.184.216.34", reason="",
        up=10, down=20, pod=None, profile="px", start=None, egress_ip="203.0.113.10") -> AccessRecord:
    r = AccessRecord("10.0.0.7", "l", start if start is not None else 999.0, client=client, method=method,
                     target=target, profile=profile, egress_addr="10.0.1.5", upstream_addr=upstream, bytes_up=up,
                     bytes_down=down, reason=reason)
    r.egress_ip = egress_ip
    if pod:
        r.extra = {"pod": pod}
    return r


def dests(doc: dict) -> dict:
    return {(d["profile"], d["destination"]): d for d in doc["destinations"]}


def test_what_counts_as_what():
    t = Tallies(clock=Clock())
    t.note(rec())  # a tunnel
    t.note(rec(method="SOCKS5"))  # a SOCKS5 tunnel: the same destination
    t.note(rec(method="GET", target="http://api.example.com/x?y=1"))  # a request (port 80 named by the URL: none)
    t.note(rec(method="GET", target="http://api.example.com:8080/"))
    t.note(rec(upstream="-", reason="destination_not_allowed", up=0, down=0))
    t.note(rec(upstream="-", reason="origin_backoff", up=0, down=0))  # a hold met
    t.note(rec(client="-", upstream="-", reason="bad_credentials"))  # nobody identified: not tallied
    t.note(rec(method="GET", target="http://egressgate.whoami/receipt", upstream="-"))  # the gateway's own answer
    t.note(rec(client="other"))
    doc = t.export("job")
    d = dests(doc)
    assert set(d) == {("px", "api.example.com:443"), ("px", "api.example.com"), ("px", "api.example.com:8080")}
    tun = d[("px", "api.example.com:443")]
    assert (tun["tunnels"], tun["requests"], tun["bytes_up"], tun["bytes_down"]) == (2, 0, 20, 40)
    assert tun["refusals"] == {"destination_not_allowed": 1, "origin_backoff": 1} and tun["holds_met"] == 1
    assert d[("px", "api.example.com")]["requests"] == 1 and d[("px", "api.example.com:8080")]["requests"] == 1
    assert doc["egress"] == [{"profile": "px", "source": "10.0.1.5", "egress_ip": "203.0.113.10", "records": 4}]
    assert [i["client"] for i in doc["identities"]] == ["job"]


def test_pods_of_a_token_client_are_apart_and_together():
    t = Tallies(clock=Clock())
    t.note(rec(client="batch/sa", pod="job-1-abc"))
    t.note(rec(client="batch/sa", pod="job-1-abc"))
    t.note(rec(client="batch/sa", pod="job-2-def"))
    assert sum(d["tunnels"] for d in t.export(pod="job-1-abc")["destinations"]) == 2
    assert sum(d["tunnels"] for d in t.export("batch/sa", "job-2-def")["destinations"]) == 1
    assert sum(d["tunnels"] for d in t.export("batch/sa")["destinations"]) == 3  # every pod of the client
    assert t.export("batch/sa", "")["identities"] == []  # "": only records without a pod


def test_the_jobs_own_query_names_its_pod():
    subject = TokenSubject("batch", "sa", "job-1-abc", "https://k", 2e9)
    token_client = Identity(ClientPolicy("k8s", None), None, subject)
    q = receipt_query(token_client, b"/receipt?since=2026-12-01T00:00:00Z")
    assert (q.client, q.pod, q.since, q.asked_by) == ("batch/sa", "job-1-abc", 1796083200.0, "job")
    q = receipt_query(token_client, b"/receipt?since=1796083200&pods=all")  # every pod of the service account
    assert (q.client, q.pod, q.since) == ("batch/sa", None, 1796083200.0)
    q = receipt_query(Identity(ClientPolicy("job", None), None), b"/receipt")
    assert (q.client, q.pod, q.since) == ("job", "", None)
    assert receipt_query(Identity(ClientPolicy("job", None), None), b"/other") is None
    for bad in (b"yesterday", b"nan", b"inf", b"2026-13-01T00:00:00Z"):
        with pytest.raises(ValueError):
            receipt_query(Identity(ClientPolicy("job", None), None), b"/receipt?since=" + bad)


def test_hosts_beyond_max_hosts_are_counted_as_other():
    t = Tallies(max_hosts=3, clock=Clock())
    for i in range(10):
        t.note(rec(target=f"h{i}.example.com:443"))
    d = dests(t.export("job"))
    assert len(d) == 4 and d[("px", OTHER)]["tunnels"] == 7
    assert t.export("job")["identities"][0]["folded"] == 7


def test_buckets_merge_coarser_further_back_and_since_counts_from_a_bucket():
    clock = Clock(0.0)
    t = Tallies(resolution=10.0, clock=clock)
    n = 1000
    for i in range(n):
        clock.t = i * 10.0 + 1
        t.note(rec(start=clock.t))
    (ident,) = t.ids.values()
    assert len(ident.buckets) == MAX_BUCKETS  # bounded; nothing lost
    assert sum(d["tunnels"] for d in t.export("job")["destinations"]) == n
    spans = [b.end - b.start for b in ident.buckets]
    assert spans[-1] == 10.0 and spans == sorted(spans, reverse=True)  # fine recently, coarser back in time
    assert max(spans) <= n * 10.0 / 4  # (no single bucket swallows the past)
    end = clock.t - 1 + 10
    recent = t.export("job", since=end - 15)  # the bucket holding since is counted whole
    assert sum(d["tunnels"] for d in recent["destinations"]) == 2 and recent["counted_from"] == end - 20
    back = t.export("job", since=end - 3600)  # an hour back: counted from the start of the bucket holding it
    assert end - 3600 - 2 * 3600 <= back["counted_from"] <= end - 3600
    count = sum(d["tunnels"] for d in back["destinations"])
    assert count == (end - back["counted_from"]) / 10


def test_destination_entries_are_bounded_across_buckets():
    clock = Clock(0.0)
    t = Tallies(max_hosts=4, resolution=10.0, clock=clock)
    for i in range(200):
        clock.t = i * 10.0
        t.note(rec(target=f"h{i % 4}.example.com:443"))
    (ident,) = t.ids.values()
    assert ident.entries <= 4 * 4 and sum(len(b.hosts) for b in ident.buckets) == ident.entries
    assert sum(d["tunnels"] for d in t.export("job")["destinations"]) == 200


def test_idle_identities_expire_and_the_idlest_is_evicted():
    clock = Clock(0.0)
    t = Tallies(max_identities=3, idle_expiry=100.0, clock=clock)
    for name in ("a", "b", "c"):
        t.note(rec(client=name))
    clock.t = 50.0
    t.note(rec(client="a"))  # a is the most recently active now
    t.note(rec(client="d"))  # full: b (idle longest) goes
    assert sorted(i.client for i in t.ids.values()) == ["a", "c", "d"] and t.evicted == 1
    clock.t = 120.0
    assert [i["client"] for i in t.export()["identities"]] == ["a", "d"] and t.expired == 1  # c: idle 120s


def test_merge_adds_workers_up():
    clock = Clock()
    w0, w1 = Tallies(clock=clock), Tallies(clock=clock)
    w0.note(rec(up=1, down=2))
    w1.note(rec(up=3, down=4, start=900.0))
    w1.note(rec(upstream="-", reason="egress_rate_limit", up=0, down=0))
    m = merge([w0.export("job"), w1.export("job")])
    (d,) = m["destinations"]
    assert (d["tunnels"], d["bytes_up"], d["bytes_down"], d["refusals"], d["first"]) == \
        (2, 4, 6, {"egress_rate_limit": 1}, 900.0)
    assert m["identities"] == [{"client": "job", "pod": None, "first": 1000.0, "last": 1000.0, "folded": 0}]
    assert m["egress"][0]["records"] == 2


def _receipt() -> dict:
    t = Tallies(clock=Clock())
    t.note(rec())
    return signing.build(merge([t.export("job")]), {"client": "job", "pod": None, "asked_by": "job"}, 1000.0, None,
                         {"scope": "instance"}, {"version": "x"}, lambda p, d: "vendor" if d.startswith("api.") else None)


def test_a_signed_receipt_verifies_and_a_changed_one_does_not():
    key = Ed25519PrivateKey.generate()
    doc = signing.sign(_receipt(), key)
    assert doc["receipt"]["destinations"][0]["provider"] == "vendor"
    assert doc["receipt"]["totals"]["tunnels"] == 1
    again = json.loads(json.dumps(doc, indent=1, ensure_ascii=False))  # as served, as saved
    assert signing.verify(again, key.public_key())[0]
    assert signing.verify(again)[0]
    for change in (lambda r: r["totals"].__setitem__("tunnels", 2), lambda r: r.__setitem__("extra", 1),
                   lambda r: r["subject"].__setitem__("client", "someone-else")):
        tampered = json.loads(json.dumps(doc))
        change(tampered["receipt"])
        ok, why = signing.verify(tampered, key.public_key())
        assert not ok and "changed after signing" in why
    other = Ed25519PrivateKey.generate()
    ok, why = signing.verify(doc, other.public_key())
    assert not ok and "signed by another key" in why
    bad = json.loads(json.dumps(doc))
    bad["signature"]["value"] = base64.b64encode(b"x" * 64).decode()
    assert not signing.verify(bad)[0]
    assert not signing.verify({"receipt": {}})[0]


def test_keys_in_and_out():
    key = Ed25519PrivateKey.generate()
    pem = signing.private_to_pem(key)
    assert signing.public_text(signing.private_from_pem(pem).public_key()) == signing.public_text(key.public_key())
    text = signing.public_text(key.public_key())
    assert signing.raw_public(signing.public_from_text(text)) == signing.raw_public(key.public_key())
    with pytest.raises(ValueError, match="32 bytes"):
        signing.public_from_text(base64.b64encode(b"short").decode())
    with pytest.raises(ValueError, match="not an unencrypted PEM"):
        signing.private_from_pem(b"nonsense")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(ValueError, match="not Ed25519"):
        signing.private_from_pem(ec_pem)
