"""Every top-level config key is either applied by a reload or refused by name (issue 11 item 7):
a key added to the schema without a decision here fails this test."""

from __future__ import annotations

from egressgate.app import LIVE_KEYS, RESTART_KEYS
from egressgate.config.schema import Config


def test_every_config_key_is_reloadable_or_named_as_restart_only() -> None:
    assert not set(LIVE_KEYS) & set(RESTART_KEYS)
    assert set(LIVE_KEYS) | set(RESTART_KEYS) == set(Config.model_fields)
