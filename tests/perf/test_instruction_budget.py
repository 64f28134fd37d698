"""The regression guard of issue 27: user-space instructions egressgate executes per forwarded
plain-HTTP request and per CONNECT tunnel, counted by valgrind's callgrind exactly as
``bench/instructions.py`` counts them (two copies side by side doing N and 5N operations, so
start-up and periodic work cancel; ``PYTHONHASHSEED=0``; ``GLIBC_TUNABLES`` keeping glibc off
``rep stosb``/``rep movsb``; ``log.access: none``), against the budgets in ``bench/budgets.json``.

``make test`` runs this guard twice: on the pure build against ``budgets``, and in the compiled
run (``.venv-compiled``, issue 27) on the compiled build (the ``egressgate-compiled`` peer)
against ``compiled_budgets``. Which one is the build of the interpreter running the test.

It counts instructions, it times nothing: a busy machine makes it slower, not different. A change
that needs more instructions raises the budget in the same commit and says why."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import egressgate
from tests import required

_BENCH = str(Path(__file__).resolve().parents[2] / "bench")
sys.path.insert(0, _BENCH)
try:
    import instructions  # noqa: E402
finally:  # bench/ must not shadow installed packages for the tests that follow
    while _BENCH in sys.path:
        sys.path.remove(_BENCH)

OPS = 20  # N; the second copy does 5N (counts agree within ~1 % from N=20 to N=200)
COMPILED = egressgate.build_kind() == "compiled"  # this run's build: measure that one
PEER = "egressgate-compiled" if COMPILED else "egressgate"
BUDGETS = json.loads(instructions.BUDGETS.read_text())["compiled_budgets" if COMPILED else "budgets"]


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    """Both kinds measured at once (two cores): the guard stays near a minute."""
    required.tool("valgrind")
    tmps = {}
    for k in ("request", "tunnel"):  # one directory each: a measure removes its callgrind files
        tmps[k] = tmp_path_factory.mktemp(f"callgrind-{k}")
        tmps[k].chmod(0o755)
    far = instructions.FarEnds()
    out: dict = {}
    try:
        errors = instructions._in_threads([
            lambda k=k: out.__setitem__(k, instructions.measure(PEER, k, OPS, far, tmps[k]))
            for k in ("request", "tunnel")])
    finally:
        far.close()
    if errors:
        raise errors[0]
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["request", "tunnel"])
def test_instructions_per_operation_within_budget(counts, kind):
    r = counts[kind]
    per_op, budget = r["per_op"], BUDGETS[kind]
    print(f"{PEER} {kind}: {per_op:,.0f} instructions per operation (budget {budget:,})")
    assert per_op > 0.25 * budget, f"implausibly few instructions per {kind}: {r}"
    assert per_op <= budget, (
        f"{PEER}: {per_op:,.0f} instructions per {kind} exceed the budget {budget:,} (bench/budgets.json); "
        f"profile with `bench/instructions.py --kinds {kind} --peers {PEER} --profile`")
