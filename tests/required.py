"""What the suite needs to run, and how a missing piece is reported.

Every test that cannot run without a tool, a Python package or a machine feature asks for it
here. Locally a missing one is a skip that says so; under CI (``CI=true``, or
``EGRESSGATE_REQUIRE_TOOLS=1``, or ``pytest --require-tools``) the hook in ``tests/conftest.py``
turns such a skip into a failure, so a green CI run has run everything. ``make test``
installs all of them (the Makefile's ``deb-packages`` and the ``test`` extra).
"""

from __future__ import annotations

import importlib
import shutil
import socket
from types import ModuleType
from typing import NoReturn

import pytest

MISSING = "missing required tool"  # the hook recognises skips by this text


def missing(what: str, how: str = "`make test` installs it") -> NoReturn:
    pytest.skip(f"{MISSING}: {what} ({how})")


def tool(program: str, how: str = "`make test` installs it") -> str:
    """The path of ``program`` on PATH, or a required-tool skip."""
    path = shutil.which(program)
    if path is None:
        missing(program, how)
    return path


def module(name: str, how: str = "pip install -e '.[test]'") -> ModuleType:
    """Import a Python package the tests need, or a required-tool skip."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"Python package {name} ({exc})", how)


def ipv6_loopback() -> socket.socket:
    """A listening socket on [::1] (port 0), or a required-tool skip when the machine has no
    IPv6 loopback."""
    try:
        return socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError as exc:
        missing(f"IPv6 loopback ({exc})", "enable IPv6 on lo")
