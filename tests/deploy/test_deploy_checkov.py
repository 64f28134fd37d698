"""checkov over deploy/ (Terraform, Kubernetes, Argo, Dockerfile) with zero failed checks.

checkov pins bc-python-hcl2, which installs the same `hcl2` package as python-hcl2 (used by the
other tests), so it lives in its own venv. Looked up in this order: $EGRESSGATE_CHECKOV,
.venv/checkov-venv/bin/checkov, .venv-checkov/bin/checkov, `checkov` on PATH. Create it with:
    python3 -m venv .venv/checkov-venv && .venv/checkov-venv/bin/pip install checkov
Accepted deviations are skipped in the files themselves with a written reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from conftest import DEPLOY, REPO

from tests import required

FRAMEWORKS = ["terraform", "kubernetes", "argo_workflows", "dockerfile"]


def checkov_binary():
    for cand in (
        os.environ.get("EGRESSGATE_CHECKOV"),
        REPO / ".venv" / "checkov-venv" / "bin" / "checkov",
        REPO / ".venv-checkov" / "bin" / "checkov",
        shutil.which("checkov"),
    ):
        if cand and os.path.exists(cand):
            return str(cand)
    return None


@pytest.fixture(scope="module")
def report():
    exe = checkov_binary()
    if not exe:
        required.missing("checkov", "a separate venv, see this module's docstring; `make test` creates it")
    proc = subprocess.run(
        [
            exe,
            "--directory",
            str(DEPLOY),
            "--framework",
            *FRAMEWORKS,
            "--skip-download",
            "--output",
            "json",
            "--soft-fail",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        env=dict(os.environ, BC_SKIP_MAPPING="TRUE", CHECKOV_RUN_SCA_PACKAGE_SCAN_V2="false"),
    )
    assert proc.stdout.strip(), proc.stderr[-2000:]
    data = json.loads(proc.stdout)
    return data if isinstance(data, list) else [data]


def test_every_framework_scanned_something(report):
    scanned = {r["check_type"]: r["summary"]["passed"] + r["summary"]["failed"] for r in report}
    for fw in FRAMEWORKS:
        assert scanned.get(fw, 0) > 0, f"checkov found nothing to check for {fw}: {scanned}"


def test_no_failed_checks(report):
    failed = [
        f"{r['check_type']}: {c['check_id']} {c['check_name']} @ {c['file_path']}:{c['resource']}"
        for r in report
        for c in r["results"]["failed_checks"]
    ]
    assert not failed, "\n".join(failed)


def test_skips_carry_a_reason(report):
    for r in report:
        for c in r["results"]["skipped_checks"]:
            comment = (c.get("check_result") or {}).get("suppress_comment", "")
            assert comment and len(comment) > 10, f"{c['check_id']} skipped without a reason"
