"""Processes the benchmark starts, and what /proc says about them (CPU, memory).

Only processes started here are ever signalled, and only by pid (the started pid and, for a
peer that forks workers, its descendants found through /proc/*/stat ppid links).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

TICK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1


# ---------------------------------------------------------------------------- /proc readers


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def proc_stat(pid: int) -> tuple[int, float] | None:
    """(ppid, utime+stime seconds) of a process (threads included, exited threads too)."""
    s = _read(f"/proc/{pid}/stat")
    if not s:
        return None
    rest = s[s.rindex(")") + 2 :].split()
    # rest[0] is state (field 3); ppid field 4, utime 14, stime 15
    return int(rest[1]), (int(rest[11]) + int(rest[12])) / TICK


def all_ppids() -> dict[int, int]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            s = _read(f"/proc/{name}/stat")
            if s:
                try:
                    out[int(name)] = int(s[s.rindex(")") + 2 :].split()[1])
                except (ValueError, IndexError):
                    pass
    return out


def tree(root: int, ppids: dict[int, int] | None = None) -> list[int]:
    """root and all its descendants (processes, not threads)."""
    ppids = ppids if ppids is not None else all_ppids()
    if root not in ppids:
        return []
    kids: dict[int, list[int]] = {}
    for p, pp in ppids.items():
        kids.setdefault(pp, []).append(p)
    out, todo = [], [root]
    while todo and len(out) < 10000:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def cpu_of(pids: list[int]) -> dict[int, float]:
    out = {}
    for p in pids:
        st = proc_stat(p)
        if st:
            out[p] = st[1]
    return out


def machine_busy() -> tuple[float, float, float]:
    """(busy, total, irq+softirq) jiffies since boot, from /proc/stat (steal counts as not ours)."""
    f = (_read("/proc/stat") or "cpu 0 0 0 0").split("\n", 1)[0].split()[1:]
    v = [int(x) for x in f] + [0] * 8
    user, nice, system, idle, iowait, irq, softirq = v[:7]
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait, irq + softirq


def threads_of(pid: int) -> int:
    s = _read(f"/proc/{pid}/status") or ""
    for line in s.splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 1


def memory_of(pids: list[int]) -> dict[str, int]:
    """Sum of Rss and Pss (KiB) over processes, from smaps_rollup."""
    rss = pss = 0
    for p in pids:
        s = _read(f"/proc/{p}/smaps_rollup")
        if not s:
            continue
        for line in s.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return {"rss_kib": rss, "pss_kib": pss, "processes": len(pids)}


# ---------------------------------------------------------------------------- started processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    role: str = ""
    capacity: float = 1.0  # cores it can use (single-threaded = 1)
    log: str | None = None
    rusage: object | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tree(self, ppids=None) -> list[int]:
        return tree(self.pid, ppids)


@dataclass
class Registry:
    """Every process the bench starts is registered here, and stopped from here by pid."""

    procs: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        role: str = "",
        capacity: float = 1.0,
        log: str | None = None,
        stdin=None,
        stdout=None,
        env=None,
        cwd=None,
    ) -> Proc:
        logf = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
        try:
            p = subprocess.Popen(
                argv,
                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                stdout=stdout if stdout is not None else logf,
                stderr=logf,
                env=env,
                cwd=cwd,
            )
        finally:
            if log:
                logf.close()
        proc = Proc(name, p, role, capacity, log)
        self.procs.append(proc)
        return proc

    def wait(self, proc: Proc, timeout: float) -> int | None:
        """Reap proc, keeping its rusage (the CPU a short-lived load generator used)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            except ChildProcessError:  # already reaped by Popen.poll()
                self._forget(proc)
                return proc.popen.returncode if proc.popen.returncode is not None else -1
            if pid == proc.pid:
                proc.rusage = ru
                proc.popen.returncode = os.waitstatus_to_exitcode(status)
                self._forget(proc)
                return proc.popen.returncode
            time.sleep(0.02)
        return None

    def stop(self, proc: Proc, grace: float = 5.0) -> None:
        if proc.popen.returncode is not None:
            self._forget(proc)
            return
        pids = proc.tree()
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if self.wait(proc, grace) is None:
            for p in pids:  # the started pid and its own descendants, by pid
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.wait(proc, 5.0)
        # descendants that outlived their parent (e.g. worker processes)
        deadline = time.monotonic() + 3
        for p in pids[1:]:
            while time.monotonic() < deadline and proc_stat(p) is not None:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
        self._forget(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc, grace=3.0)

    def _forget(self, proc: Proc) -> None:
        if proc in self.procs:
            self.procs.remove(proc)


# ---------------------------------------------------------------------------- CPU accounting


class CpuWindow:
    """CPU used by long-running processes between start() and stop(), plus machine-wide busy."""

    def __init__(self, procs: dict[str, Proc]):
        self.procs = procs

    def start(self) -> CpuWindow:
        ppids = all_ppids()
        self.t0 = time.perf_counter()
        self.m0 = machine_busy()
        self.c0 = {role: cpu_of(p.tree(ppids)) for role, p in self.procs.items()}
        return self

    def stop(self) -> dict:
        ppids = all_ppids()
        t1 = time.perf_counter()
        m1 = machine_busy()
        out = {"wall_s": t1 - self.t0, "roles": {}}
        wall = t1 - self.t0
        for role, p in self.procs.items():
            pids = p.tree(ppids)
            c1 = cpu_of(pids)
            used = sum(v - self.c0[role].get(pid, 0.0) for pid, v in c1.items())
            out["roles"][role] = {
                "name": p.name,
                "cpu_pct": 100.0 * used / wall if wall > 0 else 0.0,
                "cpu_s": used,
                "capacity_cores": p.capacity if p.capacity else min(NCPU, max(1, len(pids))),
            }
        busy = m1[0] - self.m0[0]
        total = m1[1] - self.m0[1]
        out["machine_busy_pct"] = 100.0 * busy / total if total > 0 else 0.0
        # softirq time (the loopback network stack) is not charged to any process
        # (in % of one core, like the processes' figures)
        out["softirq_cpu_pct"] = 100.0 * NCPU * (m1[2] - self.m0[2]) / total if total > 0 else 0.0
        return out


def add_loadgen_cpu(win: dict, name: str, procs: list[Proc], capacity: float) -> None:
    used = 0.0
    for p in procs:
        ru = p.rusage
        if ru is not None:
            used += ru.ru_utime + ru.ru_stime
    wall = win["wall_s"]
    win["roles"]["loadgen"] = {
        "name": name,
        "cpu_pct": 100.0 * used / wall if wall > 0 else 0.0,
        "cpu_s": used,
        "capacity_cores": capacity,
    }


def cpu_us_per_op(win: dict, ops: float, role: str = "proxy") -> float | None:
    """CPU (user + system, from /proc) a role's process tree spent per operation, in µs."""
    r = win.get("roles", {}).get(role)
    if r is None or not ops:
        return None
    return 1e6 * r["cpu_s"] / ops


def verdict(win: dict) -> str:
    """Which CPU limited this figure."""
    roles = win["roles"]
    sat = []
    for role, r in roles.items():
        cap = max(1e-9, min(NCPU, r["capacity_cores"]) * 100.0)
        r["util"] = r["cpu_pct"] / cap
        if r["util"] >= 0.88:
            sat.append((r["util"], role, r))
    top = sorted(roles.items(), key=lambda kv: -kv[1]["cpu_pct"])
    tops = ", ".join(f"{r['name']} {r['cpu_pct']:.0f}%" for _, r in top[:3])
    if sat:
        sat.sort(reverse=True)
        names = " + ".join(
            f"{r['name']} ({r['cpu_pct']:.0f}% of {min(NCPU, r['capacity_cores']):g} core"
            f"{'s' if min(NCPU, r['capacity_cores']) > 1 else ''})"
            for _, _, r in sat
        )
        return f"{names} saturated"
    irq = win.get("softirq_cpu_pct", 0.0)
    irq_s = f", kernel softirq {irq:.0f}%" if irq >= 5 else ""
    if win["machine_busy_pct"] >= 90:
        return f"machine CPU ({win['machine_busy_pct']:.0f}% of {NCPU} cores; {tops}{irq_s})"
    return f"no CPU saturated (machine {win['machine_busy_pct']:.0f}%; {tops}{irq_s})"


# ---------------------------------------------------------------------------- misc


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind((host, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def wait_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1", proc: Proc | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False
