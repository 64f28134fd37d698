"""Worker processes (``workers: N``): worker 0 starts workers 1..N-1, notices when one dies,
logs it and starts a fresh one with back-off.

How a worker is started: a fresh interpreter (``sys.executable -m egressgate serve`` with
hidden ``--worker-*`` options), never a fork of worker 0. Worker 0 restarts workers from
inside its running event loop; a fork there would inherit the loop, its selector and signal
wake-up descriptors, the access-log writer's state (a thread that does not exist in the
child, holding a lock that may be taken), every proxy and admin socket and every open client
connection -- and closing "everything but stdio" in a forked child that still runs worker 0's
Python objects is fragile. ``subprocess.Popen`` execs at once and closes every descriptor but
stdio (``close_fds``); the new worker builds its state exactly as at start-up. It costs an
interpreter start (about half a second), for an event that should be rare. The initial
workers are started the same way, so there is one code path.

The configuration a worker starts with is the text in force in worker 0 (not the file,
which may have been edited without a reload), handed over as the worker's stdin through an
anonymous memory file (nothing on disk, no pipe to block on).

A worker dies with worker 0: it sets ``PR_SET_PDEATHSIG`` (SIGTERM) first thing and checks
that its parent is still the one that started it. Popen is always called from the event
loop's (main) thread, which lives as long as worker 0: the death signal follows the thread
that created the child, not the process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..observe.accesslog import log_event

RESTART_FIRST = 0.5  # the delay before restarting a worker that died ...
RESTART_MAX = 30.0  # ... doubling on each further death, up to this
STABLE_AFTER = 60.0  # a worker that ran this long starts again from RESTART_FIRST
REAP_EVERY = 0.5  # how often worker 0 looks for dead workers (waitpid WNOHANG)
STARTUP_BLOCKED = frozenset({signal.SIGHUP, signal.SIGUSR1})  # held until a new worker can handle them


def exit_status(returncode: int) -> dict:
    """A Popen return code as ``{"status": text, "code": int|None, "signal": int|None}``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return {"status": f"killed by {name}", "code": None, "signal": -returncode}
    return {"status": f"exit code {returncode}", "code": returncode, "signal": None}


@dataclass(slots=True)
class WorkerSlot:
    index: int
    proc: subprocess.Popen | None = None
    started_at: float | None = None  # wall clock, for /status
    started_mono: float = 0.0
    restarts: int = 0
    last_exit: dict | None = None
    restart_at: float | None = None  # monotonic: when a dead worker is started again
    backoff: float = RESTART_FIRST

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class Supervisor:
    """Workers 1..count-1 of one gateway (worker 0 is the process holding this object)."""

    def __init__(self, path: str | None, count: int, sockdir: str, config_text: bytes,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.sockdir = sockdir
        self.config_text = config_text  # the configuration in force (App updates it on reload)
        self.clock = clock
        self.slots = [WorkerSlot(i) for i in range(1, count)]
        self.stopping = False
        self.on_restart: Callable[[], None] = lambda: None

    @property
    def expected(self) -> int:
        return len(self.slots) + 1

    def socket_path(self, index: int) -> str:
        return f"{self.sockdir}/w{index}.sock"

    def start_all(self) -> None:
        for slot in self.slots:
            self._spawn(slot)

    def _spawn(self, slot: WorkerSlot) -> None:
        argv = [sys.executable, "-m", "egressgate", "serve"]
        if self.path is not None:
            argv += ["--config", self.path]
        argv += ["--worker-index", str(slot.index), "--worker-dir", self.sockdir,
                 "--worker-parent", str(os.getpid())]
        fd = -1
        # The new interpreter takes a moment to import before it can handle SIGHUP / SIGUSR1,
        # whose default action is to exit: it starts with both blocked (a signal mask survives
        # exec) and unblocks them once its handlers are in place (``run_worker``).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STARTUP_BLOCKED)
        try:
            fd = _anonymous_file(self.config_text)
            slot.proc = subprocess.Popen(argv, stdin=fd, close_fds=True)
        except OSError as exc:
            slot.proc = None
            self._schedule(slot, {"status": f"could not start: {exc}", "code": None, "signal": None})
            log_event("worker_start_failed", worker=slot.index, error=str(exc),
                      restart_in=round(slot.restart_at - self.clock(), 3))
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            if fd >= 0:
                os.close(fd)
        slot.started_at = time.time()
        slot.started_mono = self.clock()
        slot.restart_at = None

    def _schedule(self, slot: WorkerSlot, exit_info: dict) -> None:
        now = self.clock()
        if slot.proc is not None and now - slot.started_mono >= STABLE_AFTER:
            slot.backoff = RESTART_FIRST
        slot.last_exit = {**exit_info, "at": time.time()}
        slot.restart_at = now + slot.backoff
        slot.backoff = min(slot.backoff * 2, RESTART_MAX)

    def reap(self) -> None:
        """Collect workers that exited (no zombies), log each, and schedule its restart."""
        for slot in self.slots:
            proc = slot.proc
            if proc is None or proc.returncode is not None:
                continue
            code = proc.poll()  # waitpid(pid, WNOHANG)
            if code is None:
                continue
            info = exit_status(code)
            uptime = round(self.clock() - slot.started_mono, 3)
            if self.stopping:
                log_event("worker_exited", worker=slot.index, pid=proc.pid, **info, uptime_s=uptime, restart=False)
                continue
            self._schedule(slot, info)
            log_event("worker_exited", worker=slot.index, pid=proc.pid, **info, uptime_s=uptime,
                      restart_in=round(slot.restart_at - self.clock(), 3))

    def restart_due(self) -> None:
        now = self.clock()
        for slot in self.slots:
            if self.stopping or slot.restart_at is None or now < slot.restart_at or slot.alive:
                continue
            slot.restarts += 1
            self.on_restart()
            try:
                os.unlink(self.socket_path(slot.index))  # the dead worker's private socket
            except OSError:
                pass
            self._spawn(slot)
            if slot.proc is not None:
                log_event("worker_restarted", worker=slot.index, pid=slot.proc.pid, restarts=slot.restarts)

    def tick(self) -> None:
        self.reap()
        self.restart_due()

    def stop(self) -> None:
        """No more restarts (drain or exit)."""
        self.stopping = True

    def pids(self) -> list[int]:
        return [slot.proc.pid for slot in self.slots if slot.alive]

    def signal_all(self, sig: int) -> None:
        for slot in self.slots:
            if slot.alive:
                try:
                    slot.proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def live(self) -> int:
        return sum(1 for slot in self.slots if slot.alive)

    def sockets(self) -> list[tuple[int, str]]:
        return [(slot.index, self.socket_path(slot.index)) for slot in self.slots]

    def snapshot(self) -> list[dict]:
        return [{"index": slot.index, "pid": slot.proc.pid if slot.proc is not None else None,
                 "alive": slot.alive, "started_at": slot.started_at, "restarts": slot.restarts,
                 "last_exit": slot.last_exit} for slot in self.slots]

    def wait_all(self, timeout: float) -> None:
        """After worker 0's loop ended: wait up to ``timeout`` for the workers to finish
        draining, then kill what is left. Bounded in time; leaves no zombie."""
        deadline = self.clock() + timeout
        for slot in self.slots:
            if slot.proc is None:
                continue
            try:
                slot.proc.wait(max(0.0, deadline - self.clock()))
            except subprocess.TimeoutExpired:
                log_event("worker_killed", worker=slot.index, pid=slot.proc.pid, reason="drain took too long")
                slot.proc.kill()
                slot.proc.wait()


def _anonymous_file(data: bytes) -> int:
    """A readable descriptor holding ``data``, positioned at its start, with no name on disk."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("egressgate-config")
    else:  # pragma: no cover - not Linux
        import tempfile

        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd


def die_with_parent(parent: int) -> bool:
    """In a worker: get SIGTERM when worker 0 dies; False if it already has."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    return os.getppid() == parent


class WorkerTable:
    """Worker 0's answer to the admin endpoints' ``WorkerView``: itself plus the supervised
    workers (none with ``workers: 1``)."""

    def __init__(self, supervisor: Supervisor | None) -> None:
        self.supervisor = supervisor
        self.started_at = time.time()

    def sockets(self) -> list[tuple[int, str]]:
        return self.supervisor.sockets() if self.supervisor is not None else []

    def snapshot(self) -> dict:
        own = {"index": 0, "pid": os.getpid(), "alive": True, "started_at": self.started_at, "restarts": 0,
               "last_exit": None}
        others = self.supervisor.snapshot() if self.supervisor is not None else []
        return {"expected": 1 + len(others), "live": 1 + sum(1 for w in others if w["alive"]),
                "workers": [own, *others]}
