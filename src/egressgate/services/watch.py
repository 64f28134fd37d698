"""Reload by itself when the config file changes (``reload.watch``): for a Kubernetes
ConfigMap volume, and for anything else that replaces the file without sending SIGHUP.

Polling, not inotify (no dependency, and it sees through symlinks). Kubernetes updates a
ConfigMap volume by writing a new timestamped directory and swapping the ``..data`` symlink
atomically; the file ``--config`` names is a symlink through ``..data``, so it never changes
itself, but ``os.stat`` follows links and the file it resolves to is a new one. Every
``reload.interval`` the resolved file's stamp (device, inode, mtime in ns, size) is taken:

- a stamp that differs from the last one is only noted: the file must keep it for one more
  poll (debounce: a writer still writing, several updates in a row);
- then the content is read through one open descriptor whose stamp must still be the settled
  one before and after the read (a writer that truncated or rewrote the file in between makes
  it a new change, looked at again on the next poll: never half a file);
- the content read is hashed, and reloaded only when the hash differs from the
  last content loaded *or refused*, whichever reload read it (this watcher, SIGHUP, POST
  /-/reload). So a reload by hand is not repeated, and a broken file is reported once
  (``reload_failed``, ``egressgate_config_reloads_total{result="failure"}``), not every poll;
  the old configuration stays in force until the file changes again.

The first check after start compares the file with what was loaded at start, so an update
that lands while the gateway starts is not lost. Only worker 0 watches; its reload is
``App.reload``, the same all-or-nothing reload as SIGHUP, which passes SIGHUP on to the other
workers. ``Settle`` (when has a change settled?) is pure; ``ConfigWatcher`` does the file
I/O; ``watch`` is the loop. The poll runs on the event loop itself: a ``stat`` of a local file
(a ConfigMap volume is tmpfs) takes microseconds and the file is read only once a change has
settled, while the shared default executor would start threads at moments nobody chose (and
make password checks queue behind polls).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable

from ..config.schema import ReloadConfig
from ..errors import ConfigError
from ..proxy.build import read_config_file

Stamp = tuple[int, int, int, int] | None  # (st_dev, st_ino, st_mtime_ns, st_size); None: cannot stat
_NEVER = (-1, -1, -1, -1)  # no stamp taken yet: the first poll is a change


def stamp_of(path: str) -> Stamp:
    try:
        st = os.stat(path)  # follows symlinks: the file ..data points at now
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _fstamp(fd: int) -> Stamp:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def digest(text: bytes | None) -> str | None:
    """The config hash of ``text`` (as ``Runtime.config_hash``); None for an unreadable file."""
    return None if text is None else hashlib.sha256(text).hexdigest()


class Settle:
    """Fed one stamp per poll, says when a change has settled: the poll after the one that
    saw a new stamp, if the stamp held still in between. Once per change."""

    def __init__(self) -> None:
        self.stamp: Stamp = _NEVER
        self.pending = False

    def poll(self, stamp: Stamp) -> bool:
        if stamp != self.stamp:
            self.stamp, self.pending = stamp, True
            return False
        if self.pending:
            self.pending = False
            return True
        return False


class ConfigWatcher:
    """The file at ``path`` and the hash of the content last loaded or refused from it."""

    def __init__(self, path: str, in_force: str) -> None:
        self.path = path
        self.last = in_force
        self.settle = Settle()

    def is_new(self, text: bytes | None) -> bool:
        return digest(text) != self.last

    def note(self, text: bytes | None) -> None:
        """A reload read ``text`` (None: could not read the file) and loaded or refused it."""
        self.last = digest(text)

    def read(self) -> bytes:
        """The file's content for a reload (blocking); an unreadable file is noted, then raised."""
        try:
            return read_config_file(self.path)
        except ConfigError:
            self.note(None)
            raise

    def look(self) -> tuple[bool, bytes | None]:
        """One poll (blocking): (has a change settled, the content then; None if unreadable)."""
        if not self.settle.poll(stamp_of(self.path)):
            return False, None
        try:
            with open(self.path, "rb") as f:
                before = _fstamp(f.fileno())
                text = f.read()
                after = _fstamp(f.fileno())
        except OSError:
            return True, None
        if before != self.settle.stamp or after != before:
            # A writer changed the file between the stat and the read (or during it): what was
            # read may be half of it. Not settled: look again on the next poll.
            self.settle.stamp, self.settle.pending = after, True
            return False, None
        return True, text


async def watch(watcher: ConfigWatcher, settings: Callable[[], ReloadConfig],
                reload: Callable[[bytes | None], Awaitable[None]], on_error: Callable[[BaseException], None],
                sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
    """Poll until cancelled. ``settings`` is read every round: a reload may change the
    interval or turn watching off (then the file is not looked at) and on again."""
    while True:
        await sleep(settings().interval)
        if not settings().watch:
            continue
        try:
            changed, text = watcher.look()
            if changed and watcher.is_new(text):
                await reload(text)
        except Exception as exc:  # the watcher must never stop
            on_error(exc)
