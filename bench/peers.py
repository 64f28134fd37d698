"""The peers under test, and the origin: install (Debian packages), minimal configs, start/stop.

Every server listens on its own 127.0.0.1 port, writes no access log and (Squid) caches nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from procs import NCPU, Proc, Registry, free_ports, wait_port

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
EGRESSGATE = VENV_BIN / "egressgate"
# the compiled build (issue 27: `make compiled`; Cython): peers named ``...-compiled`` run it
COMPILED_VENV_BIN = ROOT / ".venv-compiled" / "bin"
BODY = (b"egressgate bench origin body " * 4)[:99] + b"\n"  # 100 bytes

PACKAGES = [  # (binary, [packages to try, first with a candidate wins])
    ("squid", ["squid"]),
    ("tinyproxy", ["tinyproxy"]),
    ("wrk", ["wrk"]),
    ("nginx", ["nginx-light", "nginx"]),
    ("danted", ["dante-server"]),  # the SOCKS5 peer (bench/socks_figure.py)
    ("traffic_server", ["trafficserver"]),  # Apache Traffic Server
    ("valgrind", ["valgrind"]),  # instruction counts (bench/instructions.py)
]


def which(binary: str) -> str | None:
    return shutil.which(binary, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def ensure_packages(needed: set[str], log=print) -> None:
    """apt-get install whatever of squid/tinyproxy/wrk/nginx/danted is missing (apt-get update once first)."""
    missing = [(b, pkgs) for b, pkgs in PACKAGES if b in needed and not which(b)]
    if not missing:
        return
    if os.geteuid() != 0:
        log(f"missing {', '.join(b for b, _ in missing)} and not root: install them with apt-get")
        return
    log("apt-get update (once) to install: " + ", ".join(b for b, _ in missing))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], env=env, check=False, stdout=subprocess.DEVNULL, timeout=300)
    for binary, pkgs in missing:
        for pkg in pkgs:
            pol = subprocess.run(
                ["apt-cache", "policy", pkg], capture_output=True, text=True, timeout=60
            ).stdout
            m = re.search(r"Candidate:\s*(\S+)", pol)
            if not m or m.group(1) == "(none)":
                continue
            log(f"apt-get install {pkg} ({m.group(1)})")
            # policy-rc.d usually stops the package from starting its own service; if it did not,
            # the packaged daemon listens on its default port, which the bench never uses.
            subprocess.run(
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", pkg],
                env=env,
                check=False,
                stdout=subprocess.DEVNULL,
                timeout=600,
            )
            break
        if not which(binary):
            log(f"could not install {binary}")


def version_of(argv: list[str], pattern: str) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    m = re.search(pattern, r.stdout + r.stderr)
    return m.group(1) if m else "?"


@dataclass
class Env:
    """The far ends every peer is measured against."""

    tmp: Path
    origin_port: int
    sink_port: int
    echo_ports: list[int]

    @property
    def connect_ports(self) -> list[int]:
        return [self.sink_port, *self.echo_ports]


# ---------------------------------------------------------------------------- origin


def start_nginx(reg: Registry, tmp: Path, port: int) -> Proc:
    d = tmp / "nginx"
    (d / "logs").mkdir(parents=True, exist_ok=True)
    body = BODY.decode().rstrip("\n").replace('"', "")
    conf = d / "nginx.conf"
    conf.write_text(f"""
worker_processes {NCPU};
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
daemon off;
worker_rlimit_nofile 20000;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp_body;
    proxy_temp_path {d}/tmp_proxy;
    fastcgi_temp_path {d}/tmp_fcgi;
    uwsgi_temp_path {d}/tmp_uwsgi;
    scgi_temp_path {d}/tmp_scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server_tokens off;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ default_type text/plain; return 200 "{body}\\n"; }}
    }}
}}
""")
    p = reg.start(
        "nginx",
        [which("nginx") or "nginx", "-p", str(d), "-c", str(conf), "-e", f"{d}/logs/error.log"],
        role="origin",
        capacity=NCPU,
        log=str(d / "stdout.log"),
    )
    if not wait_port(port, proc=p):
        raise RuntimeError(f"nginx did not start; see {d}/logs/error.log")
    return p


# ---------------------------------------------------------------------------- peers


@dataclass
class Peer:
    name: str
    label: str = ""
    auth: str | None = None  # user:pass the clients must send
    capacity: float = 1.0  # cores the peer can use
    port: int = 0
    proc: Proc | None = None
    version: str = "?"
    notes: list[str] = field(default_factory=list)
    # how the peer's server process is launched: a command in front of its argv (valgrind, for
    # bench/instructions.py), extra environment, and how long its port may take to open
    wrap: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    start_timeout: float = 30.0

    def launch(self, reg: Registry, name: str, argv: list[str], role: str = "proxy", capacity: float = 1.0,
               log: str | None = None) -> Proc:
        """Start the peer's server process (through ``wrap``, with ``env`` added)."""
        env = dict(os.environ, **self.env) if self.env else None
        return reg.start(name, [*self.wrap, *argv], role=role, capacity=capacity, log=log, env=env)

    def unavailable(self) -> str | None:
        return None

    def start(self, reg: Registry, env: Env) -> Proc:
        raise NotImplementedError

    def stop(self, reg: Registry) -> None:
        if self.proc is not None:
            reg.stop(self.proc, grace=5.0)
            self.proc = None


class NoProxy(Peer):
    def __init__(self):
        super().__init__("none", "no proxy")


class Squid(Peer):
    def __init__(self):
        super().__init__("squid", "Squid")
        self.version = version_of(["squid", "-v"], r"Version (\S+)") if which("squid") else "?"
        self.label = f"Squid {self.version}"

    def unavailable(self):
        return None if which("squid") else "squid is not installed"

    def start(self, reg, env):
        self.port = free_ports(1)[0]
        d = env.tmp / f"squid-{self.port}"  # (two instances may run at once: bench/instructions.py)
        d.mkdir(exist_ok=True)
        os.chmod(d, 0o777)  # squid drops to the 'proxy' user
        conf = d / "squid.conf"
        conf.write_text(f"""
http_port 127.0.0.1:{self.port}
http_access allow all
cache deny all
cache_mem 8 MB
access_log none
cache_store_log none
cache_log {d}/cache.log
pid_filename {d}/squid.pid
coredump_dir {d}
visible_hostname egressgate-bench
max_filedescriptors 20000
shutdown_lifetime 0 seconds
pinger_enable off
logfile_rotate 0
""")
        self.proc = self.launch(reg, "squid", [which("squid"), "-N", "-f", str(conf)], log=str(d / "stdout.log"))
        if not wait_port(self.port, timeout=self.start_timeout, proc=self.proc):
            raise RuntimeError(f"squid did not start; see {d}/cache.log")
        return self.proc


class Tinyproxy(Peer):
    def __init__(self):
        super().__init__("tinyproxy", "tinyproxy", capacity=NCPU)
        self.version = version_of(["tinyproxy", "-v"], r"tinyproxy (\S+)") if which("tinyproxy") else "?"
        self.label = f"tinyproxy {self.version}"

    def unavailable(self):
        return None if which("tinyproxy") else "tinyproxy is not installed"

    def start(self, reg, env):
        self.port = free_ports(1)[0]
        d = env.tmp / f"tinyproxy-{self.port}"
        d.mkdir(exist_ok=True)
        os.chmod(d, 0o777)
        conf = d / "tinyproxy.conf"
        ports = "\n".join(f"ConnectPort {p}" for p in env.connect_ports)
        conf.write_text(f"""
User nobody
Group nogroup
Port {self.port}
Listen 127.0.0.1
Timeout 600
MaxClients 25000
Allow 127.0.0.0/8
{ports}
LogLevel Critical
LogFile "{d}/tinyproxy.log"
PidFile "{d}/tinyproxy.pid"
""")
        self.proc = self.launch(reg, "tinyproxy", [which("tinyproxy"), "-d", "-c", str(conf)], capacity=NCPU,
                                log=str(d / "stdout.log"))
        if not wait_port(self.port, timeout=self.start_timeout, proc=self.proc):
            raise RuntimeError(f"tinyproxy did not start; see {d}/stdout.log")
        return self.proc


class TrafficServer(Peer):
    """Apache Traffic Server as a forward proxy: remapping not required, no reverse proxy, cache
    off, CONNECT to the bench's ports; everything else as packaged (threads: autoconfig). Its
    own run root in the temp dir (config copied from /etc/trafficserver), run as the current user."""

    def __init__(self):
        super().__init__("trafficserver", "Traffic Server", capacity=NCPU)
        self.version = version_of(["traffic_server", "--version"], r"Traffic Server (\S+)") \
            if which("traffic_server") else "?"
        self.label = f"Traffic Server {self.version}"
        self.start_timeout = 60.0

    def unavailable(self):
        return None if which("traffic_server") else "traffic_server is not installed (apt-get install trafficserver)"

    def start(self, reg, env):
        self.port = free_ports(1)[0]
        d = env.tmp / f"trafficserver-{self.port}"
        etc = d / "etc"
        for sub in ("run", "log", "cache"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        if not etc.exists():
            shutil.copytree("/etc/trafficserver", etc, symlinks=True)
        (d / "runroot.yaml").write_text("".join(f"{k}: {v}\n" for k, v in {
            "prefix": d, "exec_prefix": "/usr", "bindir": "/usr/bin", "sbindir": "/usr/sbin",
            "sysconfdir": etc, "datadir": d / "cache", "includedir": "/usr/include",
            "libdir": "/usr/lib/trafficserver", "libexecdir": "/usr/lib/trafficserver/modules",
            "localstatedir": d / "run", "runtimedir": d / "run", "logdir": d / "log",
            "cachedir": d / "cache"}.items()))
        ports = " ".join(str(p) for p in env.connect_ports)
        (etc / "records.config").write_text(f"""\
CONFIG proxy.config.http.server_ports STRING {self.port}:ipv4:ip-in=127.0.0.1
CONFIG proxy.config.url_remap.remap_required INT 0
CONFIG proxy.config.reverse_proxy.enabled INT 0
CONFIG proxy.config.http.connect_ports STRING {ports}
CONFIG proxy.config.http.cache.http INT 0
CONFIG proxy.config.log.logging_enabled INT 0
CONFIG proxy.config.admin.user_id STRING #-1
CONFIG proxy.config.diags.debug.enabled INT 0
CONFIG proxy.config.net.connections_throttle INT 30000
""")
        (etc / "storage.config").write_text("")  # no cache disks: the cache is off
        self.proc = self.launch(reg, "trafficserver", [which("traffic_server"), f"--run-root={d}"],
                                capacity=NCPU, log=str(d / "stdout.log"))
        if not wait_port(self.port, timeout=self.start_timeout, proc=self.proc):
            raise RuntimeError(f"traffic_server did not start; see {d}/log/diags.log")
        return self.proc


def dante_config(d: Path, port: int) -> str:
    """Dante (danted) as a SOCKS5 server with no authentication, CONNECT to 127.0.0.0/8."""
    return (
        f"logoutput: {d / 'danted.log'}\n"
        f"internal: 127.0.0.1 port = {port}\n"
        "external: 127.0.0.1\n"
        "clientmethod: none\nsocksmethod: none\n"
        "user.privileged: root\nuser.unprivileged: nobody\n"
        "client pass {\n  from: 127.0.0.0/8 to: 0.0.0.0/0\n  log: error\n}\n"
        "socks pass {\n  from: 127.0.0.0/8 to: 127.0.0.0/8\n  command: connect\n  log: error\n}\n")


class Dante(Peer):
    """Dante's SOCKS5 server (several processes: the mother and its negotiate/request/io children)."""

    def __init__(self):
        super().__init__("dante", "Dante", capacity=NCPU)
        self.version = version_of(["dpkg-query", "-W", "-f", "${Version}", "dante-server"], r"(\S+)")
        self.label = f"Dante {self.version}"
        self.socks_port = 0

    def unavailable(self):
        return None if which("danted") else "danted is not installed (apt-get install dante-server)"

    def start(self, reg, env):
        self.port = self.socks_port = free_ports(1)[0]
        d = env.tmp / f"dante-{self.port}"
        d.mkdir(exist_ok=True)
        conf = d / "danted.conf"
        conf.write_text(dante_config(d, self.port))
        self.proc = self.launch(reg, "dante", [which("danted"), "-f", str(conf), "-p", str(d / "danted.pid")],
                                capacity=NCPU, log=str(d / "stderr.log"))
        if not wait_port(self.port, timeout=self.start_timeout, proc=self.proc):
            raise RuntimeError(f"danted did not start; see {d}")
        return self.proc


class Egressgate(Peer):
    PASSWORD = "secret"
    RULES = 1000

    def __init__(self, policy: bool, workers: int | None, protect: bool = False, fleet: bool = False,
                 blocks: str = "", compiled: bool = False):
        super().__init__(("egressgate-fleet" if fleet else f"egressgate-{blocks}" if blocks else
                          "egressgate-protect" if protect else "egressgate-policy" if policy else "egressgate")
                         + ("-compiled" if compiled else ""))
        # the Cython-compiled build in .venv-compiled (`make compiled`), else the pure one in .venv
        self.compiled = compiled
        self.bin = COMPILED_VENV_BIN if compiled else VENV_BIN
        self.exe = self.bin / "egressgate"
        self.policy = policy or protect or fleet or bool(blocks)
        self.protect = protect or fleet  # policy, plus shared-IP protection of the target (limits never reached)
        self.fleet = fleet  # protect, with its budgets leased from a fleet store (a redis-server started here)
        self.redis: Proc | None = None
        self.redis_port = 0
        # block-aware egress (issue 30), with policy: "blocks": the target is a provider's
        # destination (every request and tunnel watched); "blocks-idle": providers with match
        # are configured, the target is none of theirs (the lookup alone)
        self.blocks = blocks
        self.workers = workers
        self.capacity = 0  # 0: as many cores as it has processes (workers), up to the machine's
        self.label = (
            "egressgate" + (" + policy" if self.policy else "") + (" + protect" if self.protect else "")
            + (" + fleet store" if fleet else "") + (f" + {blocks}" if blocks else "")
            + (f" ({workers} workers)" if workers else "") + (" [compiled]" if compiled else "")
        )
        if self.policy:
            self.auth = "bench:" + self.PASSWORD
        self._hash: str | None = None
        self.socks = False  # also a ``protocol: socks5`` listener, on ``socks_port``
        self.socks_port = 0

    def unavailable(self):
        if not self.exe.exists():
            return f"{self.exe} does not exist yet" + (" (make compiled)" if self.compiled else "")
        if self.fleet and shutil.which("redis-server") is None:
            return "redis-server is not installed (Debian package redis-server)"
        return None

    def stop(self, reg):
        super().stop(reg)
        if self.redis is not None:
            reg.stop(self.redis, grace=5.0)
            self.redis = None

    def _password_hash(self) -> str:
        if self._hash is None:
            r = subprocess.run(
                [str(self.exe), "hash-password", "--allow-short"],
                input=self.PASSWORD,
                capture_output=True,
                text=True,
                timeout=30,
            )
            if r.returncode != 0 or not r.stdout.strip():
                raise RuntimeError(f"egressgate hash-password failed: {r.stderr.strip()}")
            self._hash = r.stdout.strip().splitlines()[-1]
        return self._hash

    def config_text(self, env: Env, admin_port: int, with_log: bool = True) -> str:
        ports = ", ".join(str(p) for p in [*env.connect_ports, env.origin_port])
        socks = f', {{address: "127.0.0.1:{self.socks_port}", protocol: socks5}}' if self.socks_port else ""
        lines = [
            f'listen: [{{address: "127.0.0.1:{self.port}"}}{socks}]',
            f'admin: {{address: "127.0.0.1:{admin_port}"}}',
        ]
        if self.workers:
            lines.append(f"workers: {self.workers}")
        if with_log:
            lines.append("log: {access: none}")
        lines.append(f"security: {{allow_private: [127.0.0.0/8], connect_ports: [{ports}]}}")
        if self.redis_port:
            lines.append(f'fleet: {{redis: {{url: "redis://127.0.0.1:{self.redis_port}"}}}}')
        if not self.policy:
            lines.append("clients: [{name: bench, from: [127.0.0.0/8]}]")
        else:
            lines += ["egress:", "  bound:", "    bind: [127.0.0.1]"]
            if self.protect:  # the target is protected; the limits are far above what the load reaches
                lines.append('    protect: [{name: bench, destinations: ["127.0.0.1"], max_concurrent: 1000000, '
                             "max_per_second: 1000000000}]")
            if self.blocks:  # (one check at start-up, in both copies: it cancels out)
                match = "127.0.0.1" if self.blocks == "blocks" else "*.vendor-x.example"
                lines.append(f'    providers: [{{name: vendor-x, url: "http://127.0.0.1:{env.origin_port}/", '
                             f'interval: 1h, match: ["{match}", "*.vendor-x.test"], '
                             '  markers: {body: ["captcha"]}}]')
            lines += [
                "clients:",
                "  - name: bench",
                "    from: [127.0.0.0/8]",
                "    username: bench",
                f'    password_hash: "{self._password_hash()}"',
                "    egress: [bound]",
                "    allow:",
            ]
            lines += [f'      - "host-{i}.example.com"' for i in range(self.RULES - 1)]
            lines.append('      - "127.0.0.1"')
        return "\n".join(lines) + "\n"

    def start(self, reg, env):
        self.port, admin_port, socks_port, redis_port = free_ports(4)
        self.socks_port = socks_port if self.socks else 0
        d = env.tmp / f"{self.name}-{self.port}"  # (two instances may run at once: bench/instructions.py)
        d.mkdir(exist_ok=True)
        if self.fleet:  # (not under the wrap: only the gateway's instructions are counted)
            self.redis_port = redis_port
            self.redis = reg.start("redis", [which("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1",
                                             "--save", "", "--appendonly", "no", "--dir", str(d)],
                                   role="store", log=str(d / "redis.log"))
            if not wait_port(redis_port, timeout=10, proc=self.redis):
                raise RuntimeError(f"redis-server did not start; see {d}/redis.log")
        conf = d / "egressgate.yaml"
        conf.write_text(self.config_text(env, admin_port))
        chk = subprocess.run(
            [str(self.exe), "check-config", str(conf)], capture_output=True, text=True, timeout=60
        )
        if chk.returncode != 0:
            msg = (chk.stdout + chk.stderr).strip()
            if "log" in msg:
                self.notes.append(
                    f"check-config rejected log.access: none ({msg.splitlines()[0]}); ran without it"
                )
                print(
                    f"  note: egressgate check-config rejected the log key; retrying without it:\n    {msg}",
                    file=sys.stderr,
                )
                conf.write_text(self.config_text(env, admin_port, with_log=False))
                chk = subprocess.run(
                    [str(self.exe), "check-config", str(conf)], capture_output=True, text=True, timeout=60
                )
            if chk.returncode != 0:
                raise RuntimeError(f"egressgate check-config failed:\n{(chk.stdout + chk.stderr).strip()}")
        # (the venv's interpreter named directly: under valgrind the process counted is Python's)
        self.proc = self.launch(reg, self.name, [str(self.bin / "python"), "-m", "egressgate", "serve", "--config",
                                                 str(conf)], capacity=self.capacity, log=str(d / "stdout.log"))
        if not wait_port(self.port, timeout=self.start_timeout, proc=self.proc):
            raise RuntimeError(f"egressgate did not start; see {d}/stdout.log")
        time.sleep(0.3 if not self.workers else 1.0)  # let SO_REUSEPORT workers come up
        if self.version == "?":
            self.version = version_of([str(self.exe), "--version"], r"(\d+\.\d+\S*)")
            if self.version != "?":
                self.label = self.label.replace("egressgate", f"egressgate {self.version}", 1)
        return self.proc


def make_peers(names: list[str], egressgate_workers: int | None) -> list[Peer]:
    out: list[Peer] = []
    for n in names:
        if n.startswith("egressgate") and n.endswith("-compiled"):  # any variant, on the compiled build
            (peer,) = make_peers([n.removesuffix("-compiled")], egressgate_workers)
            out.append(Egressgate(peer.policy, egressgate_workers, protect=peer.protect, fleet=peer.fleet,
                                  blocks=peer.blocks, compiled=True))
            continue
        if n == "squid":
            out.append(Squid())
        elif n == "tinyproxy":
            out.append(Tinyproxy())
        elif n == "trafficserver":
            out.append(TrafficServer())
        elif n == "dante":
            out.append(Dante())
        elif n == "egressgate":
            out.append(Egressgate(False, egressgate_workers))
        elif n == "egressgate-policy":
            out.append(Egressgate(True, egressgate_workers))
        elif n == "egressgate-protect":
            out.append(Egressgate(True, egressgate_workers, protect=True))
        elif n == "egressgate-fleet":
            out.append(Egressgate(True, egressgate_workers, fleet=True))
        elif n in ("egressgate-blocks", "egressgate-blocks-idle"):
            out.append(Egressgate(True, egressgate_workers, blocks=n.removeprefix("egressgate-")))
        else:
            raise SystemExit(f"unknown peer {n!r} (squid, tinyproxy, trafficserver, dante, egressgate, "
                             "egressgate-policy, egressgate-protect, egressgate-fleet, egressgate-blocks, "
                             "egressgate-blocks-idle; any egressgate one with -compiled appended)")
    return out
