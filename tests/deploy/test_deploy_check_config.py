"""The shipped Kubernetes ConfigMap passes ``egressgate check-config --offline`` as CI runs it:
no Secret mounted, no password files, no environment variables."""

from __future__ import annotations

import subprocess
import sys

from conftest import k8s_objects


def test_configmap_passes_offline_check(tmp_path):
    text = k8s_objects()[("ConfigMap", "egressgate-config")]["data"]["config.yaml"]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    # --strict: a warning fails too (e.g. an admin listener off loopback without a token)
    r = subprocess.run([sys.executable, "-m", "egressgate", "check-config", "--offline", "--strict", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith(f"{path}: OK") and r.stderr == "", r.stdout + r.stderr
    # ... and without --offline the same file fails here: the Secret's files are not on this machine
    r = subprocess.run([sys.executable, "-m", "egressgate", "check-config", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "password_file: file not found: /etc/egressgate/secrets/" in r.stderr, r.stderr
