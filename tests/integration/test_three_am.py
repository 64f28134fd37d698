"""The documented "3 a.m. questions" (docs/operations.md, between the ``3am`` markers), run
as written -- jq and curl in bash -- against a real gateway's access log and ``/status``, for a
job identified by its source address and one identified by a Kubernetes token (issue 29: items
4 and 5, and the done-when). Also: every document gives its times both ways (ISO 8601 and Unix
seconds) by one convention."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from datetime import UTC
from pathlib import Path

import pytest

from .conftest import need
from .oidc import Issuer
from .peers import base_config, connect, open_tunnel, read_head

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
MEMBER = "127.0.0.2"  # the profile's egress source address
JOB_Y = "127.0.0.5"  # job-y's own address
SA = "data-jobs/vendor-x-collector"
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def issuer(ca):
    i = Issuer(ca)
    yield i
    i.close()


def questions() -> dict[str, str]:
    """The documented commands, by question number ("1", "2", "3")."""
    text = DOCS.read_text()
    block = text.split("<!-- 3am-begin -->", 1)[1].split("<!-- 3am-end -->", 1)[0]
    block = block.split("```sh\n", 1)[1].rsplit("```", 1)[0]
    found: dict[str, list[str]] = {}
    current = None
    for line in block.splitlines():
        m = re.match(r"# (\d)\. ", line)
        if m:
            current = m.group(1)
            found[current] = []
        elif current is not None and not line.startswith("#"):
            found[current].append(line)
    return {k: "\n".join(v) for k, v in found.items()}


def ask(number: str, cwd: Path, **env: str) -> list[str]:
    need("jq")
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", questions()[number]], cwd=cwd, capture_output=True,
                       text=True, timeout=30, env={"PATH": "/usr/bin:/bin:/usr/local/bin", **env})
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.splitlines() if line]


def _answer(source: str, gw, request: bytes) -> bytes:
    """``request`` from ``source`` on a new connection: the answer's head."""
    with connect(gw.address, source, timeout=10) as s:
        s.sendall(request)
        return read_head(s)


def _get(url: str, proxy: str | None = None):
    handlers = [urllib.request.ProxyHandler({"http": proxy} if proxy else {})]
    with urllib.request.build_opener(*handlers).open(url, timeout=10) as r:
        return json.loads(r.read())


def test_the_three_am_questions_from_the_log_and_status_alone(start_gateway, issuer, ca_file, origin, tmp_path):
    gw = start_gateway(base_config(
        security={"connect_ports": [origin.port]},
        egress={"vendor-x": {"bind": [MEMBER]}},
        clients=[{"name": "job-y", "from": [f"{JOB_Y}/32"], "egress": ["vendor-x"], "allow": ["127.0.0.1"]},
                 {"name": "k8s-jobs", "from": ["127.0.0.1/32"], "egress": ["vendor-x"],
                  "kubernetes": {"issuer": issuer.url, "audiences": ["egressgate"], "ca_file": ca_file,
                                 "service_accounts": [SA]}}]))
    gw.wait_event("jwks_fetched")
    target = f"127.0.0.1:{origin.port}"
    # job-y: one request that left through the member, then two refusals naming the same host
    assert _answer(JOB_Y, gw, f"GET {origin.url('/x')} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
                   .encode()).startswith(b"HTTP/1.1 200")
    open_tunnel(gw, "127.0.0.1:9", source=JOB_Y, expect=b"HTTP/1.1 403").close()
    assert _answer(JOB_Y, gw, b"GET http://denied.example/ HTTP/1.1\r\nHost: denied.example\r\n\r\n") \
        .startswith(b"HTTP/1.1 403")
    # the token job: whoami, an open tunnel while /status is asked, then an expired token
    token = issuer.mint()
    me = _get("http://egressgate.whoami/", f"http://k8s:{token}@{gw.address}")
    assert me["client"] == SA and me["pod"] == "collector-7d9f"
    assert me["kubernetes"]["expires_iso"] == _iso(me["kubernetes"]["expires"])
    with open_tunnel(gw, target, headers={"Host": target, "Proxy-Authorization": f"Bearer {token}"},
                     expect=b"HTTP/1.1 200") as tunnel:
        rows = ask("3", tmp_path, ADMIN=gw.admin)
        assert [r.split("\t")[:6] for r in rows] == [[SA, "collector-7d9f", "tunnel", "vendor-x", MEMBER, target]]
        status = _get(gw.admin + "/status")
        assert status["config"]["loaded_at_iso"] == _iso(status["config"]["loaded_at"])
        tunnel.sendall(f"GET /t HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode())
        while tunnel.recv(65536):
            pass
    expired = issuer.mint(issued=-700, lifetime=600)
    open_tunnel(gw, target, headers={"Proxy-Authorization": f"Bearer {expired}"}, expect=b"HTTP/1.1 407").close()
    gw.wait_log(lambda r: r["reason"] == "token_expired")
    tunnel_rec = gw.wait_log(lambda r: r["method"] == "CONNECT" and r["client"] == SA)
    log = tmp_path / "access.log"
    log.write_text("".join(gw.stdout_lines()))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for rec in records:  # one convention: ISO 8601 with Unix seconds beside it, start and end
        assert ISO.fullmatch(rec["ts"]) and ISO.fullmatch(rec["end_ts"]), rec
        assert rec["ts"] == _iso(rec["ts_unix"]) and rec["end_ts"] == _iso(rec["end_ts_unix"])
        assert rec["ts_unix"] <= rec["end_ts_unix"]

    # 1. why was job X denied: by name, and for a token job by what its refused token claims
    denied = [json.loads(r) for r in ask("1", tmp_path, JOB="job-y")]
    assert sorted(d["reason"] for d in denied) == ["connect_port_not_allowed", "destination_not_allowed"]
    denied = [json.loads(r) for r in ask("1", tmp_path, JOB=SA)]
    assert [(d["reason"], d["pod"], d["client"]) for d in denied] == [("token_expired", "collector-7d9f", "-")]

    # 2. which IP at time T: the request that left, not the refusals to the same host; the
    # tunnel for the whole of its life (T between its start and its end)
    got = next(r for r in records if r["client"] == "job-y" and r["status"] == 200)
    rows = ask("2", tmp_path, JOB="job-y", HOST="127.0.0.1", T=got["ts"])
    assert [r.split("\t")[3:] for r in rows] == [[MEMBER, "not attested"]]
    middle = _iso((tunnel_rec["ts_unix"] + tunnel_rec["end_ts_unix"]) / 2)
    rows = ask("2", tmp_path, JOB=SA, HOST="127.0.0.1", T=middle)
    assert [r.split("\t")[2:4] for r in rows] == [["CONNECT", MEMBER]]
    late = _iso(tunnel_rec["end_ts_unix"] + 60)
    assert ask("2", tmp_path, JOB=SA, HOST="127.0.0.1", T=late) == []

    # the README's and the runbook's "which IPs did job Y use" (over a day): refusals not counted
    readme = (DOCS.parents[1] / "README.md").read_text()
    query = re.search(r"Which public IP did a job use .*?: `(jq .*?uniq -c)`", readme, re.S).group(1)
    assert _run(" ".join(query.split()), tmp_path).split() == ["1", "not", "attested"]
    text = DOCS.read_text()
    query = re.search(r"Over a day, which IPs .*?\n`(jq .*?uniq -c)`", text, re.S).group(1)
    query = " ".join(query.split()).replace("2026-12-01", got["ts"][:10])
    assert _run(query, tmp_path, JOB="job-y", HOST="127.0.0.1").split() == ["1", "not", "attested"]


def _run(command: str, cwd: Path, **env: str) -> str:
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=cwd, capture_output=True, text=True,
                       timeout=30, env={"PATH": "/usr/bin:/bin:/usr/local/bin", **env})
    assert r.returncode == 0, r.stderr
    return r.stdout


def _iso(t: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(round(t, 3), UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

