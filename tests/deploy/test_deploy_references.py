"""Comments and docs of deploy/ (and the docs/ runbooks, README) point only at files that exist.
Defect: they named deploy/kubernetes/secret.yaml, DESIGN.md and tests/deploy/test_dockerfile.py."""

from __future__ import annotations

import re

from conftest import DEPLOY

ROOT = DEPLOY.parent
_REF = re.compile(r"(?<![\w/.-])((?:deploy|docs|tests|src|bench|scripts)/[A-Za-z0-9_./-]*[A-Za-z0-9_-])"
                  r"|(?<![\w/.-])([A-Z][A-Z_]+\.md)\b")
# Paths an operator creates (secrets), a run writes (bench results), or kubectl's deploy/NAME form.
CREATED = re.compile(r"^(deploy/kubernetes/secrets/[\w-]+|bench/results/.*|deploy/egressgate)$")


def _texts():
    for f in [*DEPLOY.rglob("*"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]:
        if f.is_file() and f.suffix not in (".json",) and "google_schema" not in f.parts:
            try:
                yield f, f.read_text()
            except UnicodeDecodeError:
                continue


def test_every_referenced_file_exists():
    missing = []
    for f, text in _texts():
        for m in _REF.finditer(text):
            ref = m.group(1) or m.group(2)
            if CREATED.match(ref):
                continue
            if not any((base / ref).exists() for base in (ROOT, f.parent)):
                missing.append(f"{f.relative_to(ROOT)}: {ref}")
    assert not missing, "\n".join(missing)
