"""Every top-level config key is either applied by a reload or refused by name (issue 11 item 7):
a key added to the schema without a decision here fails this test."""

from __future__ import annotations

from egressgate.app import LIVE_KEYS, RESTART_KEYS
from egressgate.config.schema import Config


def test_every_config_key_is_reloadable_or_named_as_restart_only() -> None:
    assert not set(LIVE_KEYS) & set(RESTART_KEYS)
    assert set(LIVE_KEYS) | set(RESTART_KEYS) == set(Config.model_fields)


def test_a_jwks_file_is_looked_at_again_at_most_once_per_min_refresh(tmp_path) -> None:
    """issue 29 item 10: an unknown key id re-reads a changed jwks_file, but not more often than
    min_refresh (a flood of tokens with made-up key ids costs one stat per interval)."""
    import json
    import os

    from egressgate.proxy.build import JwksFile, _parse_jwks_file
    from tests.integration.oidc import Signer

    signer = Signer()
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(signer.jwks("k1")))
    now = [100.0]
    keys = JwksFile(str(path), _parse_jwks_file(str(path)), 10.0, clock=lambda: now[0])
    path.write_text(json.dumps(signer.jwks("k1", "e1")))
    os.utime(path, ns=(1, 1))  # (a changed stamp whatever the file system's time resolution)
    assert keys.get("e1") is None  # looked at the file less than min_refresh ago (at start)
    now[0] += 10.0
    assert keys.get("e1") is not None and keys.get("k1") is not None
    path.write_text(json.dumps(signer.jwks("e1")))
    os.utime(path, ns=(2, 2))
    now[0] += 5.0
    assert keys.get("nope") is None and keys.get("k1") is not None  # not yet: still the old keys
    now[0] += 5.0
    assert keys.get("nope") is None and keys.get("k1") is None  # re-read: k1 is gone
