"""Commands docs/operations.md tells an operator to type, extracted from the doc and run as written
against a real gateway (`egressgate serve --pidfile`): the reload signal, and the logrotate stanza run
by the real logrotate. Only the pid-file and log paths are moved into the test's directory."""

from __future__ import annotations

import re
import subprocess
import urllib.request
from pathlib import Path

import pytest
from conftest import DEPLOY

from tests import required
from tests.integration.peers import GatewayProcess, base_config, wait_for

ROOT = DEPLOY.parent

OPS = ROOT / "docs" / "operations.md"
DOC_PIDFILE = "/run/egressgate/egressgate.pid"
DOC_ACCESS_LOG = "/var/log/egressgate/access.log"


def _section(title: str) -> str:
    text = OPS.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 3)
    return text[start : end if end > 0 else None]


def reload_command() -> str:
    m = re.search(r"Apply: `(kill -HUP [^`]+)`", _section("Reloading the configuration"))
    assert m, "docs/operations.md: the reload command is gone"
    return m.group(1)


def logrotate_stanza() -> str:
    m = re.search(r"```\n(/var/log/egressgate/access\.log \{.*?\n\})\n```", _section("Log rotation"), re.S)
    assert m, "docs/operations.md: the logrotate stanza is gone"
    return m.group(1)


def _here(text: str, tmp: Path) -> str:
    return text.replace(DOC_PIDFILE, str(tmp / "egressgate.pid")).replace(DOC_ACCESS_LOG, str(tmp / "access.log"))


@pytest.fixture
def gateway(tmp_path):
    cfg = base_config(log={"access": str(tmp_path / "access.log")})
    gw = GatewayProcess(cfg, tmp_path, args=("--pidfile", str(tmp_path / "egressgate.pid")))
    yield gw
    gw.kill()


def _request(gw) -> None:
    """One request the access log records (the gateway's own whoami answer)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": gw.url}))
    try:
        opener.open("http://egressgate.whoami/", timeout=10).read()
    except urllib.error.HTTPError:
        pass  # a refusal is logged as well


def test_pidfile_names_the_gateway_and_goes_away(gateway, tmp_path):
    pidfile = tmp_path / "egressgate.pid"
    assert pidfile.read_text().strip() == str(gateway.pid)
    gateway.kill()
    assert not pidfile.exists()


def test_the_documented_reload_command_reloads(gateway, tmp_path):
    before = len(gateway.events)
    r = subprocess.run(["sh", "-c", _here(reload_command(), tmp_path)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    gateway.wait_event("reloaded", after=before)


def test_the_documented_logrotate_stanza_rotates_and_the_gateway_reopens(gateway, tmp_path):
    logrotate = required.tool("logrotate")
    conf = tmp_path / "logrotate.conf"
    conf.write_text(_here(logrotate_stanza(), tmp_path).replace("delaycompress", "nodelaycompress") + "\n")
    log = tmp_path / "access.log"
    _request(gateway)
    wait_for(lambda: log.exists() and log.stat().st_size > 0, "first access-log line")
    r = subprocess.run([logrotate, "--force", "--state", str(tmp_path / "state"), str(conf)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    _request(gateway)
    wait_for(lambda: log.exists() and log.stat().st_size > 0, "the gateway writing the new access.log")


def test_the_logrotate_stanza_fails_loudly_when_the_gateway_is_gone(tmp_path):
    """Before: `kill -USR1 $(pidof -s egressgate) 2>/dev/null || true` succeeded whatever happened."""
    logrotate = required.tool("logrotate")
    conf = tmp_path / "logrotate.conf"
    conf.write_text(_here(logrotate_stanza(), tmp_path) + "\n")
    (tmp_path / "access.log").write_text("a line\n")
    r = subprocess.run([logrotate, "--force", "--state", str(tmp_path / "state"), str(conf)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0, "postrotate must fail when no gateway took the signal"


def test_no_doc_uses_pidof():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "deploy").rglob("*.md"))]:
        for line in doc.read_text().splitlines():
            assert "$(pidof" not in line, f"{doc.name}: {line.strip()} (pidof finds python, not egressgate)"

