"""The config watcher's decisions (egressgate.services.watch): when a change has settled, and which
content is new, on a directory laid out as Kubernetes lays out a ConfigMap volume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from egressgate.config import load_config_text
from egressgate.errors import ConfigError
from egressgate.services.watch import ConfigWatcher, Settle, digest, watch

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


class _WriterLandsAfterTheStat(Settle):
    """A writer that truncates and rewrites the file right after the poll that saw it settle:
    between the watcher's ``stat`` and its read (the race behind issue 25 item 10)."""

    def __init__(self, path: Path, partial: bytes) -> None:
        super().__init__()
        self.path, self.partial = path, partial

    def poll(self, stamp):
        settled = super().poll(stamp)
        if settled and self.partial is not None:
            self.path.write_bytes(self.partial)  # (truncate, then the first half of the new file)
            self.partial = None  # (once)
        return settled


def test_the_watcher_never_reads_a_file_rewritten_after_it_settled(tmp_path):
    """Defect (issue 25 items 2 and 10): the watcher took the stamp, then read the file by name:
    a writer (``Path.write_text`` truncates first) landing in between handed it half a file
    -- or an empty one, which loaded as the built-in defaults. The content is read through one
    descriptor whose stamp must be the settled one; otherwise it is a new change."""
    path = tmp_path / "config.yaml"
    path.write_bytes(b"listen:\n  - address: 127.0.0.1:3128\nclients:\n  - name: a\n    from: [10.0.0.0/8]\n")
    w = ConfigWatcher(str(path), digest(b"in force"))
    w.settle = _WriterLandsAfterTheStat(path, b"listen:\n")
    assert w.look() == (False, None)  # a new stamp: noted
    changed, text = w.look()  # settled, but rewritten before the read
    assert (changed, text) == (False, None), text
    assert w.look() == (True, b"listen:\n")  # the new content, once it held still for a poll
