#!/usr/bin/env python3
"""SOCKS5 figure: egressgate's ``protocol: socks5`` listener side by side with Dante (Debian
``dante-server``) and egressgate's own CONNECT path, in the same run, on loopback.

    .venv/bin/python bench/socks_figure.py [--quick] [--seconds S] [--bytes N]   # alone
    .venv/bin/python bench/run.py --only socks                            # as part of make bench

Per peer: tunnels/s (50 workers, each connect -> SOCKS5 no-auth negotiation (or CONNECT) ->
16-byte echo -> close, for S seconds) and the throughput of one tunnel moving N bytes each way
to a loopback sink (bench/servers.py). egressgate runs one worker with its access log off;
Dante runs as packaged (its own process model). Absolute numbers drift with the machine; the
ratios within one run are what to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # (run alone)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import dante_config  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable
EGRESSGATE = ROOT / ".venv" / "bin" / "egressgate"
CHUNK = 1 << 20
PING = b"0123456789abcdef"


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)  # a process still starting: poll its port
    raise RuntimeError(f"nothing listens on {port} after {timeout:g}s")


# --- the client side (run in a subprocess: ``socks_figure.py load ...``) -------------------------------------

def _negotiate(kind: str, target: tuple[str, int]) -> tuple[bytes, int]:
    """The request bytes and the length of the answer to read before the tunnel is up."""
    if kind == "socks5":
        req = b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton(target[0]) + struct.pack(">H", target[1])
        return req, 2 + 10
    authority = f"{target[0]}:{target[1]}"
    return f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode(), -1


def open_tunnel(kind: str, proxy: tuple[str, int], target: tuple[str, int]) -> socket.socket:
    """Blocking: a tunnel to ``target`` through ``proxy`` (methods and request pipelined for
    SOCKS5: Dante and egressgate both accept that)."""
    s = socket.create_connection(proxy, timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    req, n = _negotiate(kind, target)
    s.sendall(req)
    got = b""
    if n > 0:
        while len(got) < n:
            chunk = s.recv(n - len(got))
            if not chunk:
                raise ConnectionError(f"closed during negotiation: {got!r}")
            got += chunk
        if got[:2] != b"\x05\x00" or got[3] != 0:
            raise ConnectionError(f"refused: {got!r}")
    else:
        while b"\r\n\r\n" not in got:
            chunk = s.recv(1)
            if not chunk:
                raise ConnectionError(f"closed during CONNECT: {got!r}")
            got += chunk
        if not got.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(f"refused: {got[:100]!r}")
    return s


async def _tunnels(kind: str, proxy: tuple[str, int], targets: list[tuple[str, int]], workers: int,
                   seconds: float) -> dict:
    loop = asyncio.get_running_loop()
    done = 0
    errors: dict[str, int] = {}
    stop = loop.time() + seconds

    async def one(target) -> None:
        reader, writer = await asyncio.open_connection(*proxy)
        try:
            req, n = _negotiate(kind, target)
            writer.write(req)
            if n > 0:
                answer = await reader.readexactly(n)
                if answer[:2] != b"\x05\x00" or answer[3] != 0:
                    raise ConnectionError("refused")
            else:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise ConnectionError("refused")
            writer.write(PING)
            if await reader.readexactly(len(PING)) != PING:
                raise ConnectionError("echo")
        finally:
            writer.close()

    async def worker(i: int) -> None:
        nonlocal done
        k = i
        while loop.time() < stop:
            k += 1
            try:
                await one(targets[k % len(targets)])
                done += 1
            except (OSError, EOFError, asyncio.IncompleteReadError, ConnectionError) as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(workers)))
    elapsed = time.perf_counter() - t0
    return {"count": done, "elapsed": elapsed, "rate": done / elapsed, "errors": errors}


def throughput(kind: str, proxy: tuple[str, int], sink: tuple[str, int], n: int) -> dict:
    out = {}
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for d in ("up", "down"):
        s = open_tunnel(kind, proxy, sink)
        t0 = time.perf_counter()
        if d == "down":
            s.sendall(b"DN %020d\n" % n)
            got = 0
            while got < n:
                r = s.recv_into(view)
                if not r:
                    break
                got += r
        else:
            s.sendall(b"UP %020d\n" % n)
            payload = memoryview(b"\x5a" * CHUNK)
            left = n
            while left > 0:
                left -= s.send(payload[:min(CHUNK, left)])
            line = b""
            while not line.endswith(b"\n"):
                chunk = s.recv(64)
                if not chunk:
                    break
                line += chunk
            got = int(line.split()[1]) if line.startswith(b"OK ") else 0
        elapsed = time.perf_counter() - t0
        s.close()
        if got != n:
            raise RuntimeError(f"{kind} {d}: moved {got} of {n} bytes")
        out[d] = {"MBps": n / elapsed / 1e6, "seconds": elapsed}
    return out


# --- the peers ---------------------------------------------------------------------------------------

def start_egressgate(tmp: Path, http_port: int, socks_port: int, connect_ports: list[int]) -> subprocess.Popen:
    admin = _free_ports(1)[0]
    conf = tmp / "egressgate-socks.yaml"
    conf.write_text(
        f'listen: [{{address: "127.0.0.1:{http_port}"}}, {{address: "127.0.0.1:{socks_port}", protocol: socks5}}]\n'
        f'admin: {{address: "127.0.0.1:{admin}"}}\n'
        "log: {access: none}\n"
        f"security: {{allow_private: [127.0.0.0/8], connect_ports: [{', '.join(map(str, connect_ports))}]}}\n"
        "clients: [{name: bench, from: [127.0.0.0/8]}]\n")
    with open(tmp / "egressgate-socks.log", "wb") as err:
        p = subprocess.Popen([str(EGRESSGATE), "serve", "--config", str(conf)], stdout=subprocess.DEVNULL,
                             stderr=err)
    _wait_port(socks_port, p)
    return p


def start_dante(tmp: Path, port: int) -> subprocess.Popen:
    exe = shutil.which("danted", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if exe is None:
        raise RuntimeError("danted not found (apt-get install dante-server)")
    conf = tmp / "danted.conf"
    conf.write_text(dante_config(tmp, port))
    with open(tmp / "danted.stderr", "wb") as err:
        p = subprocess.Popen([exe, "-f", str(conf), "-p", str(tmp / "danted.pid")], stdout=subprocess.DEVNULL,
                             stderr=err)
    _wait_port(port, p)
    return p


def _version(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    return (r.stdout + r.stderr).strip().splitlines()[0][:80] if (r.stdout + r.stderr).strip() else "?"


def figure(seconds: float = 10.0, bulk_bytes: int = 1 << 30, workers: int = 50, log=print) -> dict:
    """Run the SOCKS5 figure; returns {peer: {tunnels: {...}, throughput: {...}}} and notes."""
    tmp = Path(tempfile.mkdtemp(prefix="egressgate-socks-bench-"))
    procs: list[subprocess.Popen] = []
    try:
        sink_port, http_port, socks_port, dante_port, *echo_ports = _free_ports(8)
        sink = subprocess.Popen([PY, str(BENCH / "servers.py"), "sink", "--port", str(sink_port)],
                                stdout=subprocess.PIPE)
        procs.append(sink)
        echo = subprocess.Popen([PY, str(BENCH / "servers.py"), "echo", "--ports", ",".join(map(str, echo_ports))],
                                stdout=subprocess.PIPE)
        procs.append(echo)
        for p in (sink, echo):
            if p.stdout.readline().strip() != b"ready":
                raise RuntimeError("a far end did not start")
        procs.append(start_egressgate(tmp, http_port, socks_port, [sink_port, *echo_ports]))
        procs.append(start_dante(tmp, dante_port))
        peers = {"egressgate socks5": ("socks5", socks_port), "dante": ("socks5", dante_port),
                 "egressgate CONNECT": ("connect", http_port)}
        targets = ",".join(f"127.0.0.1:{p}" for p in echo_ports)
        out: dict = {"settings": {"seconds": seconds, "bulk_bytes": bulk_bytes, "workers": workers},
                     "versions": {"dante": _version(["dpkg-query", "-W", "-f", "${Version}", "dante-server"])},
                     "peers": {}}
        for name, (kind, port) in peers.items():
            # throughput first: ten seconds of tunnels leave ~20,000 connections in TIME_WAIT, and a
            # peer that binds its source address before connecting (Dante's "external:") may find
            # no free port for one more connection right after (it answers 0x03, unreachable)
            try:
                tp = throughput(kind, ("127.0.0.1", port), ("127.0.0.1", sink_port), bulk_bytes)
            except (OSError, RuntimeError) as e:
                tp = {"error": f"{type(e).__name__}: {e}"}
            r = subprocess.run([PY, __file__, "load", "--kind", kind, "--proxy", f"127.0.0.1:{port}",
                                "--targets", targets, "--workers", str(workers), "--seconds", str(seconds)],
                               capture_output=True, text=True, timeout=seconds + 120)
            if r.returncode != 0:
                raise RuntimeError(f"{name}: load generator failed: {r.stderr[-500:]}")
            tunnels = json.loads(r.stdout.strip().splitlines()[-1])
            out["peers"][name] = {"tunnels": tunnels, "throughput": tp}
            moved = (f"up {tp['up']['MBps']:8.0f} MB/s   down {tp['down']['MBps']:8.0f} MB/s" if "error" not in tp
                     else f"throughput failed: {tp['error']}")
            log(f"   {name:<20} {tunnels['rate']:8.0f} tunnels/s ({sum(tunnels['errors'].values())} errors)   {moved}")
        return out
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        pid = tmp / "danted.pid"  # Dante's children follow their mother; the pid file names it
        if pid.exists():
            try:
                os.kill(int(pid.read_text().strip()), signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass
        shutil.rmtree(tmp, ignore_errors=True)


def markdown(res: dict) -> list[str]:
    """The figure as markdown lines (bench/report.py adds them to latest.md)."""
    if "error" in res:
        return ["## SOCKS5", "", f"failed: {res['error']}", ""]
    st = res["settings"]
    lines = ["## SOCKS5 (egressgate `protocol: socks5` vs Dante, same run)", "",
             "| peer | tunnels/s | errors | up MB/s | down MB/s |", "|---|---:|---:|---:|---:|"]
    for name, r in res["peers"].items():
        t, tp = r["tunnels"], r["throughput"]
        moved = "— | —" if "error" in tp else f"{tp['up']['MBps']:,.0f} | {tp['down']['MBps']:,.0f}"
        lines.append(f"| {name} | {t['rate']:,.0f} | {sum(t['errors'].values())} | {moved} |")
    lines += [f"- {name} throughput: {r['throughput']['error']}" for name, r in res["peers"].items()
              if "error" in r["throughput"]]
    lines += ["", f"tunnels/s: {st['workers']} workers in one process for {st['seconds']:g} s, each connect → "
              f"negotiate (SOCKS5 no-auth, or CONNECT) → 16-byte echo → close. Throughput: one tunnel moving "
              f"{st['bulk_bytes'] / 2**20:,.0f} MiB each way to a loopback sink. Dante {res['versions']['dante']}.", ""]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    load = sub.add_parser("load")
    load.add_argument("--kind", choices=["socks5", "connect"], required=True)
    load.add_argument("--proxy", required=True)
    load.add_argument("--targets", required=True)
    load.add_argument("--workers", type=int, default=50)
    load.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help="4 s of tunnels, 256 MiB each way")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--bytes", type=int, default=None)
    a = ap.parse_args(argv)
    if a.cmd == "load":
        try:
            import uvloop
            uvloop.install()
        except ImportError:
            pass
        host, port = a.proxy.rsplit(":", 1)
        targets = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in a.targets.split(",")]
        print(json.dumps(asyncio.run(_tunnels(a.kind, (host, int(port)), targets, a.workers, a.seconds))))
        return 0
    seconds = a.seconds or (4.0 if a.quick else 10.0)
    n = a.bytes or ((256 << 20) if a.quick else (2 << 30))
    res = figure(seconds, n)
    print("\n".join(markdown(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
