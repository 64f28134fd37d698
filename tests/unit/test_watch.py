"""The config watcher's decisions (egressgate.watch): when a change has settled, and which
content is new, on a directory laid out as Kubernetes lays out a ConfigMap volume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from egressgate.config import load_config_text
from egressgate.errors import ConfigError
from egressgate.watch import ConfigWatcher, Settle, digest, watch

A, B, C = (1, 10, 100, 5), (1, 11, 200, 5), (1, 11, 300, 6)


@pytest.mark.parametrize(("name", "stamps", "settled"), [
    ("the first poll is a change, settled on the next", [A, A, A], [False, True, False]),
    ("a new stamp settles one poll later, once", [A, A, B, B, B], [False, True, False, True, False]),
    ("a file still changing is not read", [A, A, B, C, C], [False, True, False, False, True]),
    ("changed and back again still settles", [A, A, B, A, A], [False, True, False, False, True]),
    ("a file that vanished settles too (reported, not ignored)", [A, A, None, None], [False, True, False, True]),
])
def test_settle(name, stamps, settled):
    s = Settle()
    assert [s.poll(stamp) for stamp in stamps] == settled, name


def configmap_volume(root: Path, text: str, generation: int) -> Path:
    """``root`` as the kubelet writes a ConfigMap volume: ``..data`` -> a timestamped
    directory, ``config.yaml`` -> ``..data/config.yaml``; a later generation swaps ``..data``
    with one rename. Returns the path the gateway is pointed at."""
    stamp = root / f"..2025_01_01_00_00_0{generation}.000000001"
    stamp.mkdir()
    (stamp / "config.yaml").write_text(text)
    tmp = root / "..data_tmp"
    tmp.symlink_to(stamp.name)
    os.replace(tmp, root / "..data")
    link = root / "config.yaml"
    if not link.is_symlink():
        link.symlink_to("..data/config.yaml")
    return link


def test_watcher_sees_a_configmap_swap_once_it_settles(tmp_path):
    first = "workers: 1\n"
    path = configmap_volume(tmp_path, first, 1)
    w = ConfigWatcher(str(path), digest(first.encode()))
    assert w.look() == (False, None)
    changed, text = w.look()  # the first check compares the file with what was loaded at start
    assert changed and not w.is_new(text)
    configmap_volume(tmp_path, "workers: 2\n", 2)  # same size, new inode behind the symlink
    assert w.look() == (False, None)
    changed, text = w.look()
    assert changed and text == b"workers: 2\n" and w.is_new(text)
    w.note(text)  # a reload read it (loaded or refused): not new any more
    assert not w.is_new(b"workers: 2\n") and w.is_new(b"workers: 1\n")
    assert w.look() == (False, None)  # nothing changed since


def test_watcher_reports_an_unreadable_file_once(tmp_path):
    path = configmap_volume(tmp_path, "workers: 1\n", 1)
    w = ConfigWatcher(str(path), digest(b"workers: 1\n"))
    (tmp_path / "..data").unlink()  # the symlink dangles
    w.look()
    assert w.look() == (True, None) and w.is_new(None)
    with pytest.raises(ConfigError, match="cannot read"):
        w.read()
    assert not w.is_new(None)


@pytest.mark.parametrize(("text", "error"), [
    ("reload: {interval: 0}\n", "<t>:1: reload.interval: must be at least 0.1, got 0"),
    ("reload:\n  watch: maybe\n", "<t>:2: reload.watch: expected true or false, got text 'maybe'"),
    ("reload: {intervall: 2s}\n", "<t>:1: reload.intervall: unknown key"),
])
def test_reload_settings_are_validated(text, error):
    with pytest.raises(ConfigError) as exc:
        load_config_text(text, "<t>")
    assert any(e.startswith(error) for e in exc.value.errors), exc.value.errors


def test_reload_settings_default_to_watching_every_two_seconds():
    cfg = load_config_text("reload: {interval: 500ms}\n", "<t>")
    assert cfg.reload.watch is True and cfg.reload.interval == 0.5
    assert load_config_text("", "<t>").reload.interval == 2.0


class _Stop(Exception):
    pass


def test_watch_loop_reloads_settled_new_content_and_follows_its_settings(tmp_path):
    """The loop, with time injected: a poll per ``sleep``; ``reload.watch: false`` (as a
    reload may set it) means the file is not looked at; interval changes are followed."""
    import asyncio

    from egressgate.config.schema import ReloadConfig

    path = configmap_volume(tmp_path, "workers: 1\n", 1)
    w = ConfigWatcher(str(path), digest(b"workers: 1\n"))
    on, off = ReloadConfig(), ReloadConfig(watch=False, interval=5)
    # per round: the settings in force, and a new ConfigMap generation published before it (or None)
    rounds = [(on, None), (on, None), (on, "workers: 2\n"), (on, None), (off, "workers: 3\n"), (off, None),
              (off, None), (on, None), (on, None)]
    slept: list[float] = []
    reloaded: list[tuple[int, bytes | None]] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) > len(rounds):
            raise _Stop
        settings, text = rounds[len(slept) - 1]
        current[0] = settings
        if text is not None:
            configmap_volume(tmp_path, text, len(slept) + 1)

    async def reload(text: bytes | None) -> None:
        reloaded.append((len(slept), text))
        w.note(text)

    current = [on]
    with pytest.raises(_Stop):
        asyncio.run(watch(w, lambda: current[0], reload, lambda exc: pytest.fail(repr(exc)), sleep=sleep))
    # round 2 compares with what is in force (no reload); the change of round 3 settles in round 4;
    # the change of round 5 is not looked at while watching is off, and is taken once it is on again
    assert reloaded == [(4, b"workers: 2\n"), (9, b"workers: 3\n")]
    assert slept == [2.0] * 5 + [5.0] * 3 + [2.0] * 2
