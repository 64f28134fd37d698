"""The short form of the soak (bench/soak.py --quick, ~35 s): mixed CONNECT and plain-HTTP
traffic with injected origin resets and reloads every 10 s must end with a passing verdict
(flat RSS and fds after warm-up, every transfer byte-exact, no crash, one log record each)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_soak_passes(tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=90, cwd=ROOT)
    tail = (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 0, tail
    assert "verdict: PASS" in r.stdout, tail
    doc = json.loads(out.read_text())
    assert doc["verdict"] == "PASS" and not doc["problems"], doc["problems"]
    # the run did what it claims: traffic of every kind, faults injected, reloads applied
    assert set(doc["operations"]) == {"get", "chunked", "post", "tunnel"}, doc["operations"]
    assert doc["faults_injected"] > 0 and doc["reloads"] >= 2 and doc["reloads_ok"] == doc["reloads"]
    assert doc["access_log_records"] == doc["requests"] > 100
    assert len(doc["samples"]) >= 10
