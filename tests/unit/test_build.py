"""Which build the tests import (issue 27): ``make test`` runs the suite on the pure-Python build
(``.venv``) and a subset on the Cython-compiled one (``.venv-compiled``), each with
``EGRESSGATE_EXPECT_BUILD`` set. In the compiled run every module setup.py compiles must import
as an extension module, so that run cannot silently test the pure code; in the pure run none
may (a stray ``.so`` in src/ would shadow its ``.py``)."""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import os
from fnmatch import fnmatch
from pathlib import Path

import pytest

import egressgate

REPO = Path(__file__).resolve().parents[2]


def _setup_list(name: str) -> list[str]:
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py has no {name} list")


def compiled_modules() -> list[str]:
    """setup.py's COMPILED globs minus EXCLUDED, as module names (from the sources in src/)."""
    src = REPO / "src"
    excluded = _setup_list("EXCLUDED")
    out = []
    for pattern in _setup_list("COMPILED"):
        for p in sorted(src.glob(pattern)):
            rel = p.relative_to(src).as_posix()
            if not any(fnmatch(rel, x) for x in excluded):
                out.append(rel.removesuffix(".py").replace("/", "."))
    return out


def is_extension(module) -> bool:
    return module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def test_setup_compiles_the_hot_core():
    mods = compiled_modules()
    assert "egressgate.policy.rules" in mods and "egressgate.http1.rewrite" in mods, mods
    assert not any(m.startswith("egressgate.config") for m in mods), "config/ must stay pure (pydantic)"


@pytest.mark.parametrize("name", compiled_modules())
def test_the_run_imports_the_build_it_says(name):
    module = importlib.import_module(name)
    expect = os.environ.get("EGRESSGATE_EXPECT_BUILD") or egressgate.build_kind()
    assert egressgate.build_kind() == expect, (
        f"EGRESSGATE_EXPECT_BUILD={expect} but this interpreter runs the {egressgate.build_kind()} build "
        f"(egressgate at {egressgate.__file__})")
    if expect == "compiled":
        assert is_extension(module), f"{name} is not compiled in the compiled run: {module.__file__}"
    else:
        assert module.__file__.endswith(".py"), f"{name} is not the pure module in the pure run: {module.__file__}"


def test_version_names_the_build(capsys):
    from egressgate.cli import main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"egressgate {egressgate.__version__} ({egressgate.build_kind()})"
