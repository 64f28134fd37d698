"""``egressgate replay`` on a log recorded from a real gateway run: a password job and an
anonymous job send requests (curl) and hold tunnels (raw sockets) through the gateway, which
writes its JSON access log to a file; the log is then replayed, under the very config that
recorded it (nothing changes, exit 0) and under a candidate that tightens a rule, moves a
client to another profile, moves a profile to another member and adds a ``protect`` limit
(each change reported with its count, exit 1). The log is also read as rotated files (one
gzipped), as two instances' logs, and with a malformed line (named by file and line; the rest
is replayed)."""

from __future__ import annotations

import gzip
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .conftest import curl
from .peers import base_config, basic_auth, open_tunnel, wait_for

PASSWORD = "correct-horse-battery"


def _replay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "egressgate", "replay", *args], capture_output=True, text=True,
                          timeout=120)


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _tunnel(gw, target: str) -> socket.socket:
    """An established CONNECT tunnel for job-a (its echo checked)."""
    s = open_tunnel(gw, target, headers={"Host": target, "Proxy-Authorization": basic_auth("job-a", PASSWORD)})
    s.sendall(b"ping")
    got = b""
    while len(got) < 4:
        got += s.recv(4)
    assert got == b"ping"
    return s


def _config(log: Path, secret: Path, origin_port: int, echo_port: int, *, candidate: bool) -> dict:
    job_a_allow = ["localhost", f"127.0.0.1:{echo_port}"] if candidate else ["localhost", "127.0.0.1"]
    default = {"direct": {}}
    if candidate:  # a new protect limit: one tunnel at a time to the echo service
        default["protect"] = [{"name": "echo-one", "destinations": [f"127.0.0.1:{echo_port}"], "max_concurrent": 1}]
    alt = {"bind": ["127.0.0.3" if candidate else "127.0.0.2"],
           # a limit that the recorded traffic never reaches, in both: replaying it changes nothing
           "protect": [{"name": "roomy", "destinations": ["localhost"], "max_per_second": 1000}]}
    return base_config(
        log={"access": str(log)},
        security={"allow_private": ["127.0.0.0/8"], "connect_ports": [443, echo_port]},
        egress={"default": default, "alt": alt},
        clients=[{"name": "job-a", "from": ["127.0.0.1/32"], "username": "job-a", "password_file": str(secret),
                  "egress": ["default", "alt"], "allow": job_a_allow},
                 {"name": "job-b", "from": ["127.0.0.1/32"], "egress": ["alt"] if candidate else ["default"]}])


def _record(start_gateway, origin, echo, tmp_path: Path) -> tuple[Path, Path, Path]:
    """Run a real gateway, drive its traffic, stop it: (its log, current config, candidate config)."""
    log = tmp_path / "access.log"
    secret = tmp_path / "job-a.secret"
    secret.write_text(PASSWORD)
    current = _config(log, secret, origin.port, echo.port, candidate=False)
    gw = start_gateway(current)
    proxy_a = f"http://job-a:{PASSWORD}@{gw.address}"
    for i in range(5):  # job-a: 5 requests to 127.0.0.1 (the candidate no longer allows it)
        assert curl("-x", proxy_a, "-o", "/dev/null", "-w", "%{http_code}", origin.url(f"/a{i}")).stdout == b"200"
    for i in range(2):  # job-a asks for profile alt (user+profile): alt's member moves in the candidate
        out = curl("-x", f"http://job-a+alt:{PASSWORD}@{gw.address}", "-o", "/dev/null", "-w", "%{http_code}",
                   origin.url(f"/alt{i}", host="localhost"))
        assert out.stdout == b"200", out
    tunnels = [_tunnel(gw, f"127.0.0.1:{echo.port}") for _ in range(3)]  # 3 at once (protect: 1)
    # The log keeps times to the millisecond: the third tunnel's start and the first one's end must
    # fall in different milliseconds for the record to show the three overlapping (not a wait for
    # anything: the clock's resolution in the log).
    time.sleep(0.01)
    for s in tunnels:
        s.close()
    for i in range(4):  # job-b (anonymous): 4 requests through profile default (alt in the candidate)
        out = curl("-x", f"http://{gw.address}", "-o", "/dev/null", "-w", "%{http_code}",
                   origin.url(f"/b{i}", host="localhost"))
        assert out.stdout == b"200", out
    for _ in range(2):  # job-b: refused today, refused in the candidate (no change)
        out = curl("-x", f"http://{gw.address}", "-p", "-o", "/dev/null", f"http://127.0.0.1:{origin.port}/")
        assert b"CONNECT tunnel failed, response 403" in out.stderr, out
    wait_for(lambda: _lines(log) >= 16, "16 access-log records in the file")
    gw.kill()
    assert _lines(log) == 16, log.read_text()
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(yaml.safe_dump(_config(log, secret, origin.port, echo.port, candidate=True), sort_keys=False))
    return log, gw.config_path, candidate


def _groups(doc: dict, kind: str) -> list[tuple]:
    return sorted((g["client"], g["destination"], g["from"], g["to"], g["records"])
                  for g in doc["changes"][kind]["groups"])


def test_replay_of_a_real_run(start_gateway, origin, echo, tmp_path):
    log, current, candidate = _record(start_gateway, origin, echo, tmp_path)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    # the fields a faithful replay needs are in the log
    assert {r.get("auth") for r in records} == {"basic", "none"}
    assert sum(r.get("requested_profile") == "alt" for r in records) == 2
    assert all(r.get("addresses") and "127.0.0.1" in r["addresses"] for r in records if "localhost" in r["target"])

    # 1. the config that recorded the log: nothing changes
    same = _replay("--config", str(current), "--json")
    assert same.returncode == 0, same.stdout + same.stderr
    doc = json.loads(same.stdout)
    assert doc["records"] == 16 and doc["replayed"] == 16, doc
    assert all(doc["changes"][k]["records"] == 0 for k in doc["changes"]), doc["changes"]
    text = _replay("--config", str(current))
    assert text.returncode == 0 and "result: no change (exit 0)" in text.stdout, text.stdout

    # 2. the candidate: each change with its count, exit 1
    cand = _replay("--config", str(candidate), "--json")
    assert cand.returncode == 1, cand.stdout + cand.stderr
    doc = json.loads(cand.stdout)
    counts = {k: v["records"] for k, v in doc["changes"].items()}
    assert counts == {"newly_denied": 5, "newly_limited": 2, "newly_allowed": 0, "moved_profile": 4,
                      "moved_member": 2, "reason_changed": 0}, doc["changes"]
    assert doc["would_refuse_allowed"] == 7
    origin_dest, echo_dest = f"127.0.0.1:{origin.port}", f"127.0.0.1:{echo.port}"
    assert _groups(doc, "newly_denied") == [
        ("job-a", origin_dest, "allowed via default", "403 destination_not_allowed (rule: allow)", 5)]
    assert _groups(doc, "newly_limited") == [
        ("job-a", echo_dest, "allowed via default", "429 egress_concurrency_limit (protect echo-one)", 2)]
    assert _groups(doc, "moved_profile") == [
        ("job-b", f"localhost:{origin.port}", "allowed via default", "allowed via alt", 4)]
    assert _groups(doc, "moved_member") == [
        ("job-a", f"localhost:{origin.port}", "allowed via alt (127.0.0.2)", "allowed via alt (127.0.0.3)", 2)]
    example = doc["changes"]["newly_denied"]["groups"][0]["examples"][0]
    assert example["where"] == f"{log}:1" and example["target"] == origin.url("/a0"), example
    # the limited ones are the second and third tunnel (the first one is admitted)
    limited = [e["where"] for e in doc["changes"]["newly_limited"]["groups"][0]["examples"]]
    tunnels = sorted((r["ts_unix"], i) for i, r in enumerate(records, 1) if r["target"] == echo_dest)
    assert len(tunnels) == 3 and limited == [f"{log}:{i}" for _, i in tunnels[1:]], (limited, tunnels)

    text = _replay("--config", str(candidate))
    assert text.returncode == 1
    for title in ("NEWLY DENIED: 5 records", "NEWLY LIMITED BY PROTECT: 2 records", "MOVED TO ANOTHER PROFILE: 4 records",
                  "MOVED TO ANOTHER MEMBER: 2 records", "result: 7 records allowed today would be refused (exit 1)"):
        assert title in text.stdout, text.stdout

    # 3. a malformed line: named by file and line, the rest replayed
    lines = log.read_text().splitlines(keepends=True)
    broken = tmp_path / "broken.log"
    broken.write_text("".join(lines[:2]) + '{"ts": "2026-12-01T00:00:00Z", "client": \n' + "".join(lines[2:]))
    out = _replay("--config", str(current), "--log", str(broken), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    doc = json.loads(out.stdout)
    assert doc["malformed"] == {"count": 1, "lines": [f"{broken}:3: not JSON: Expecting value"]}, doc["malformed"]
    assert doc["records"] == 16
    out = _replay("--config", str(candidate), "--log", str(broken))
    assert out.returncode == 1 and f"{broken}:3: not JSON" in out.stdout and "NEWLY DENIED: 5 records" in out.stdout

    # 4. rotated files (the older one gzipped), read by default from the candidate's log.access,
    # and the same records as two instances' logs given together: the same report
    (tmp_path / "access.log.1.gz").write_bytes(gzip.compress("".join(lines[:9]).encode()))
    log.write_text("".join(lines[9:]))
    rotated = json.loads(_replay("--config", str(candidate), "--json").stdout)
    assert rotated["logs"] == [str(log), str(tmp_path / "access.log.1.gz")]
    assert {k: v["records"] for k, v in rotated["changes"].items()} == counts
    one, two = tmp_path / "instance-1.log", tmp_path / "instance-2.log"
    one.write_text("".join(lines[0::2]))
    two.write_text("".join(lines[1::2]))
    both = _replay("--config", str(candidate), "--log", str(one), "--log", str(two), "--json")
    assert {k: v["records"] for k, v in json.loads(both.stdout)["changes"].items()} == counts

    # --since: only what started at or after the first tunnel (the 5 denied requests are older)
    # (the log is in end order: three tunnels closed at once may be written in any order, so the
    # first to start is found by its start time, not by its place in the file)
    since = min((r for r in records if r["target"] == echo_dest), key=lambda r: r["ts_unix"])["ts"]
    later = json.loads(_replay("--config", str(candidate), "--since", since, "--json").stdout)
    assert later["changes"]["newly_denied"]["records"] == 0 and later["changes"]["newly_limited"]["records"] == 2


def test_replay_usage_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("clients: [{name: x, from: [not-a-cidr]}]\n")
    out = _replay("--config", str(bad), "--log", str(bad))
    assert out.returncode == 2 and f"{bad}:1: " in out.stderr, out.stderr
    good = tmp_path / "good.yaml"
    good.write_text("")
    out = _replay("--config", str(good))
    assert out.returncode == 2 and "log.access is 'stdout'" in out.stderr, out.stderr
    out = _replay("--config", str(good), "--log", str(tmp_path / "missing.log"))
    assert out.returncode == 2 and "no such log file" in out.stderr
    empty = tmp_path / "empty.log"
    empty.write_text("")
    out = _replay("--config", str(good), "--log", str(empty), "--since", "yesterday")
    assert out.returncode == 2 and "--since 'yesterday'" in out.stderr


def test_progress_line_on_a_terminal_only(tmp_path):
    """stderr a terminal: a progress line redrawn in place (and a last one with the total);
    stderr a pipe (CI): nothing but the report on stdout."""
    import os
    import pty

    cfg = tmp_path / "c.yaml"
    cfg.write_text("")
    rec = {"ts_unix": 1.0, "end_ts_unix": 1.5, "client_addr": "127.0.0.1", "client": "local",
           "listener": "127.0.0.1:3128", "method": "CONNECT", "target": "example.com:443", "status": 200,
           "profile": "default", "egress_addr": "127.0.0.1", "upstream_addr": "93.184.216.34", "reason": "",
           "auth": "none", "addresses": ["93.184.216.34"]}
    log = tmp_path / "a.log"
    log.write_text((json.dumps(rec) + "\n") * 5000)
    piped = _replay("--config", str(cfg), "--log", str(log))
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "egressgate", "replay", "--config", str(cfg), "--log", str(log)],
                            stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    out, _ = proc.communicate(timeout=120)
    seen = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # (EIO: the terminal's other end is closed and everything was read)
            break
        if not chunk:
            break
        seen += chunk
    os.close(controller)
    assert proc.returncode == 0 and b"result: no change" in out
    assert b"\rreplay: 4,096 records" in seen and b"\rreplay: 5,000 records in " in seen, seen
