"""Network namespaces for the GCP emulation: "hosts" joined by veth pairs, run as root.

A namespace lives as long as its holder process (``unshare --net sleep``); nothing is written to
/run/netns or /etc, so a crashed test leaves nothing behind. Commands run in a namespace through
``nsenter``; sockets are created in one by switching the calling thread into it (``setns``), so
servers written in Python (threads of the test process) can live in any namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def unavailable_reason() -> str | None:
    """Why the emulation cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs, iptables)"
    for tool in ("unshare", "nsenter", "ip", "iptables", "iptables-restore", "curl", "bash"):
        if not shutil.which(tool):
            return f"{tool} is not installed (make deb-packages installs iptables, iproute2, util-linux, curl)"
    probe = subprocess.run(["unshare", "--net", "iptables", "-w", "5", "-S"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace with iptables here: {probe.stderr.strip()[:200]}"
    return None



_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy",
               "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


def machine_env(**extra: str) -> dict[str, str]:
    """The environment of a process on an emulated machine: the test's, without proxy variables
    (a VM or the metadata path has none; the suite points them at a closed port on purpose)."""
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    env.update(extra)
    return env

class Netns:
    def __init__(self, name: str) -> None:
        self.name = name
        self.holder = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", "ip link set lo up && echo up && exec sleep 3600"],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.holder.stdout.readline().strip() == "up", f"namespace {name} did not come up"
        self.path = f"/proc/{self.holder.pid}/ns/net"
        self.procs: list[subprocess.Popen] = []
        self.sh("sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0")

    # ------------------------------------------------------------------------------ commands
    def argv(self, argv: Sequence[str], resolv: str | None = None) -> list[str]:
        base = ["nsenter", f"--net={self.path}"]
        if resolv is None:
            return [*base, *argv]
        # a private mount namespace whose /etc/resolv.conf is `resolv` (as `ip netns exec` does)
        return [*base, "unshare", "--mount", "sh", "-c",
                'mount --bind "$0" /etc/resolv.conf && exec "$@"', resolv, *argv]

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = 60, resolv: str | None = None,
            **kw) -> subprocess.CompletedProcess[str]:
        kw.setdefault("env", machine_env())
        proc = subprocess.run(self.argv(argv, resolv), capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"[{self.name}] {' '.join(argv)} -> {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-ec", script], check=check)

    def popen(self, argv: Sequence[str], resolv: str | None = None, **kw) -> subprocess.Popen:
        kw.setdefault("env", machine_env())
        proc = subprocess.Popen(self.argv(argv, resolv), **kw)
        self.procs.append(proc)
        return proc

    # ------------------------------------------------------------------------------- sockets
    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the block with this thread inside the namespace (sockets made here stay here)."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(self.path, os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
            try:
                yield
            finally:
                if _libc.setns(home, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back failed")
        finally:
            os.close(home)
            os.close(target)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        self.holder.kill()
        self.holder.wait(5)


def link(a: Netns, a_if: str, a_addr: str | None, b: Netns, b_if: str, b_addr: str | None) -> None:
    """A veth pair between two namespaces, with an address (CIDR) on each end."""
    tmp_a, tmp_b = f"t{os.getpid() % 100000}{a_if}"[:15], f"u{os.getpid() % 100000}{b_if}"[:15]
    subprocess.run(["ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b], check=True)
    subprocess.run(["ip", "link", "set", tmp_a, "netns", str(a.holder.pid)], check=True)
    subprocess.run(["ip", "link", "set", tmp_b, "netns", str(b.holder.pid)], check=True)
    for ns, tmp, name, addr in ((a, tmp_a, a_if, a_addr), (b, tmp_b, b_if, b_addr)):
        ns.run(["ip", "link", "set", tmp, "name", name])
        if addr:
            ns.run(["ip", "addr", "add", addr, "dev", name])
        ns.run(["ip", "link", "set", name, "up"])
