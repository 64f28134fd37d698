"""The suite's own rule (tests/conftest.py): a skip for a missing required tool is a failure
under CI and a listed skip elsewhere; other skips are listed either way; proxy variables in
the environment are poisoned for every test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

INNER = '''
import os
import urllib.request

import pytest

from tests import required


def test_needs_a_tool_nobody_has():
    required.tool("egressgate-no-such-tool")


def test_skips_for_another_reason():
    pytest.skip("not applicable here")


def test_runs():
    assert os.environ["http_proxy"].startswith("http://127.0.0.1:")
    assert "no_proxy" not in os.environ and "NO_PROXY" not in os.environ
    try:
        urllib.request.urlopen("http://127.0.0.1:1/", timeout=5)  # goes to the poisoned proxy
    except OSError as exc:
        assert "refused" in str(exc).lower(), exc
    else:
        raise AssertionError("a request that honours http_proxy got through")
'''


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_inner.py").write_text(INNER)
    full = {k: v for k, v in os.environ.items() if k not in ("CI", "EGRESSGATE_REQUIRE_TOOLS")}
    full.update(env, http_proxy="http://proxy.invalid:3128", no_proxy="127.0.0.1")
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=full)


def test_locally_a_missing_tool_is_a_listed_skip(tmp_path):
    r = _run(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 2 skipped" in r.stdout, r.stdout
    assert "skips (2; local: missing required tools skip)" in r.stdout, r.stdout
    assert "SKIP test_inner.py::test_needs_a_tool_nobody_has: missing required tool: egressgate-no-such-tool" \
        in r.stdout, r.stdout
    assert "SKIP test_inner.py::test_skips_for_another_reason: not applicable here" in r.stdout, r.stdout


def test_under_ci_a_missing_tool_fails(tmp_path):
    r = _run(tmp_path, CI="true")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failed, 1 passed, 1 skipped" in r.stdout, r.stdout
    assert any(line.startswith("FAILED ") and "test_inner.py::test_needs_a_tool_nobody_has" in line
               for line in r.stdout.splitlines()), r.stdout
    assert "skips (1; CI: missing required tools fail)" in r.stdout, r.stdout


def test_the_explicit_switch_works_like_ci(tmp_path):
    assert "1 failed, 1 passed, 1 skipped" in _run(tmp_path, EGRESSGATE_REQUIRE_TOOLS="1").stdout
