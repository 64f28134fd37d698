"""Suite-wide rules.

- Under CI (``CI=true``, ``EGRESSGATE_REQUIRE_TOOLS=1`` or ``--require-tools``) a skip for a
  missing required tool (see ``tests/required.py``) is a failure: a green CI run ran everything.
- The summary lists every skip, one line each, with its reason.
- Proxy variables in the environment point at a port where nothing listens, for every test and
  every process it starts: a test or helper that honours ``http_proxy`` instead of talking to
  loopback directly fails at once instead of passing or failing by the caller's environment.
"""

from __future__ import annotations

import os
import socket

import pytest

from tests.required import MISSING

_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
_NO_PROXY_VARS = ("no_proxy", "NO_PROXY")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--require-tools", action="store_true",
                     help="a skip for a missing required tool fails the test (on by default when CI=true)")


def _strict(config: pytest.Config) -> bool:
    return (config.getoption("--require-tools")
            or os.environ.get("CI", "").lower() in ("true", "1", "yes")
            or os.environ.get("EGRESSGATE_REQUIRE_TOOLS", "") not in ("", "0"))


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if MISSING in reason and _strict(item.config):
        report.outcome = "failed"
        report.longrepr = f"a required tool is missing, and under CI that is a failure, not a skip:\n{reason}"
    else:
        item.config.stash.setdefault(_SKIPS, []).append((report.nodeid, reason))


_SKIPS = pytest.StashKey[list]()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    skips = config.stash.get(_SKIPS, [])
    mode = "CI: missing required tools fail" if _strict(config) else "local: missing required tools skip"
    terminalreporter.section(f"skips ({len(skips)}; {mode})", sep="-")
    for nodeid, reason in skips:
        terminalreporter.line(f"SKIP {nodeid}: {reason}")
    if not skips:
        terminalreporter.line("no test was skipped")


@pytest.fixture(scope="session", autouse=True)
def no_environment_proxy():
    """Point every proxy variable at a port held closed for the session (see the docstring)."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    poison = f"http://127.0.0.1:{holder.getsockname()[1]}"
    saved = {k: os.environ.get(k) for k in _PROXY_VARS + _NO_PROXY_VARS}
    for k in _PROXY_VARS:
        os.environ[k] = poison
    for k in _NO_PROXY_VARS:
        os.environ.pop(k, None)
    try:
        yield poison
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        holder.close()
