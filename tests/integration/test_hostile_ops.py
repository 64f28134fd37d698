"""Hostile peers against the operational surfaces (issue 12, part II): the access log, metric
labels, the admin listener and worker processes. Every test drives a real gateway process
from real sockets and checks the bound (RSS within a fixed margin of a baseline, descriptors
back to their baseline), that a well-behaved client is still served meanwhile, and the
status / access-log record / metric that shows what happened.

- a log destination that stops taking records (a stalled stdout reader, a log directory that
  vanished before SIGUSR1) costs bounded memory, drops are counted, the writer survives;
- client-chosen names (``X-Egressgate-Profile``, ``user+profile``, methods) never become
  metric label values: the number of series stays fixed under a flood of random ones;
- the admin listener caps its connections and closes silent or slow ones;
- a worker killed with SIGKILL is reaped, logged, restarted and shown; merged counters do not
  go backwards;
- an egress-IP echo service that swallows connections does not stop the prober.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import select
import signal
import socket
import string
import threading
import urllib.error
import urllib.request

from .faulty import Blackhole
from .peers import ReservedPort, base_config, raw_exchange, wait_for

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the suite poisons proxy variables
MiB = 1024  # in KiB, the unit of GatewayProcess.rss_kib()
SECRET = "hostile-ops-secret"
SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{.*\})?) (\S+)$")


# ------------------------------------------------------------------------------------ helpers

def admin_get(gw, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with OPENER.open(gw.admin + path, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def scrape(gw) -> str:
    status, body = admin_get(gw, "/metrics")
    assert status == 200, body[:200]
    return body.decode()


def series(text: str) -> dict[str, float]:
    """Every sample line of an exposition: {name{labels}: value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = SERIES.match(line)
            assert m, f"not a sample line: {line[:200]!r}"
            out[m.group(1)] = float(m.group(2))
    return out


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``; 0 when none."""
    total = 0.0
    for key, v in series(text).items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', rest))
        if all(have.get(k) == want for k, want in labels.items()):
            total += v
    return total


class Footprint:
    """A process's RSS and descriptors at a quiet moment, to compare against later."""

    def __init__(self, gw) -> None:
        self.gw = gw
        self.rss = gw.rss_kib()
        self.fds = gw.fd_count()

    def grew_kib(self) -> int:
        return self.gw.rss_kib() - self.rss

    def assert_rss_within(self, margin_kib: int, what: str) -> None:
        grew = self.grew_kib()
        assert grew < margin_kib, f"{what}: RSS grew {grew} KiB (margin {margin_kib} KiB, baseline {self.rss} KiB)"

    def wait_fds_back(self, what: str, timeout: float = 15.0, slack: int = 0) -> None:
        wait_for(lambda: self.gw.fd_count() <= self.fds + slack,
                 f"{what}: descriptors back to {self.fds} + {slack} (now {self.gw.fd_count()})", timeout=timeout)


def well_behaved_get(gw, origin, tag: str) -> bytes:
    """A normal client's request through the proxy; it must complete while the hostile one runs."""
    resp = raw_exchange(gw.address, f"GET {origin.url('/' + tag)} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
                        timeout=15, read_until_close=False)
    assert resp.startswith(b"HTTP/1.1 200"), resp[:200]
    assert resp.endswith(f"hello /{tag}\n".encode()), resp[-200:]
    return resp


def name_of(rng: random.Random, size: int) -> str:
    """A client-chosen profile name: a valid header / username token, never a configured one."""
    return "x" + "".join(rng.choices(string.ascii_letters + string.digits + "-_.", k=size - 1))


def refused(gw, request: bytes) -> int:
    """The status of one request on its own connection (a complete response must come)."""
    resp = raw_exchange(gw.address, request, timeout=15, read_until_close=False)
    assert resp.startswith(b"HTTP/1.1 "), resp[:200]
    return int(resp.split(b" ", 2)[1])


def profile_flood(gw, count: int, size: int, seed: int) -> None:
    """``count`` requests, each refused (403) for asking for a random profile of ``size`` bytes,
    with a 2 KiB path: each gives one access-log record of about 2 KiB (the gateway clips both)."""
    rng = random.Random(seed)
    pad = "q" * 2000
    for i in range(count):
        req = (f"GET http://denied.example/{pad}/f{i} HTTP/1.1\r\nHost: denied.example\r\n"
               f"X-Egressgate-Profile: {name_of(rng, size)}\r\n\r\n").encode()
        assert refused(gw, req) == 403


JOB_CLIENTS = [
    {"name": "job", "from": ["127.0.0.0/8"], "username": "job", "password_env": "HOSTILE_JOB_SECRET",
     "egress": ["default"], "allow": ["allowed.example", "127.0.0.1"]},
    {"name": "anon", "from": ["127.0.0.0/8"], "egress": ["default"], "allow": ["allowed.example", "127.0.0.1"]},
]
JOB_ENV = {"HOSTILE_JOB_SECRET": SECRET}


# ------------------------------------------------------------------------- 1. the access log

LOG_FLOOD = (1000, 40 * 1024)  # requests x bytes of client-chosen text each (records keep ~2 KiB of it)
LOG_QUEUE = "256KiB"  # records are bounded (target 2 KiB, profile 64 B): a small queue to overflow


class SwitchableReader:
    """Reads the gateway's stdout into ``gw.log`` while switched on; while off, nobody reads
    the pipe (a log shipper that stalled)."""

    def __init__(self, gw) -> None:
        self.gw = gw
        self.on = threading.Event()
        self.on.set()
        self.stopped = False
        self.fd = gw.proc.stdout.fileno()
        self.buf = b""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped:
            if not self.on.wait(0.1) or not select.select([self.fd], [], [], 0.1)[0]:
                continue
            data = os.read(self.fd, 1 << 16)
            if not data:
                return
            *lines, self.buf = (self.buf + data).split(b"\n")
            for line in lines:
                try:
                    self.gw.log.append(json.loads(line))
                except ValueError:
                    pass

    def close(self) -> None:
        self.stopped = True
        self.on.set()
        self.thread.join(5)


def test_stalled_stdout_reader_costs_bounded_memory(start_gateway, origin):
    """The reader of the gateway's stdout stops: the pipe fills, the writer blocks, and records
    beyond ``log.max_queue`` (default 8 MiB) are dropped and counted -- memory does not grow
    with the flood, the proxy keeps serving, and the writer carries on once the reader is back."""
    gw = start_gateway(base_config(clients=JOB_CLIENTS, log={"max_queue": LOG_QUEUE}), env=JOB_ENV,
                       read_stdout=False)
    reader = SwitchableReader(gw)
    try:
        count, size = LOG_FLOOD
        profile_flood(gw, count, size, seed=1)  # warm-up: the same traffic, read as it comes
        well_behaved_get(gw, origin, "warm")
        wait_for(lambda: any(rec.get("target", "").endswith("/warm") for rec in gw.log), "the warm-up records")
        base = Footprint(gw)
        reader.on.clear()  # the reader stalls
        profile_flood(gw, count, size, seed=2)
        well_behaved_get(gw, origin, "during")  # the proxy is not held up by its log
        text = scrape(gw)
        dropped = value(text, "egressgate_log_dropped_total", reason="queue_full")
        queued = value(text, "egressgate_log_queue_bytes")
        print(f"stalled stdout: {count} records of {size} B; RSS +{base.grew_kib()} KiB over the warm baseline "
              f"{base.rss} KiB; dropped {dropped:.0f}; queued {queued:.0f} B")
        base.assert_rss_within(16 * MiB, "a stalled stdout reader")
        assert dropped >= count // 2, f"only {dropped:.0f} of {count} records dropped; the pipe holds 64 KiB"
        assert queued <= 8 << 20
        # the reader is back: the queue drains and new records get through (the writer lives)
        reader.on.set()
        wait_for(lambda: value(scrape(gw), "egressgate_log_queue_bytes") == 0, "the log queue to drain", timeout=30)
        well_behaved_get(gw, origin, "after")
        wait_for(lambda: any(rec.get("target", "").endswith("/after") for rec in gw.log), "the record of /after")
        base.wait_fds_back("after the stalled reader")
    finally:
        reader.close()


def test_reopen_into_a_vanished_directory_keeps_logging(start_gateway, origin, tmp_path):
    """SIGUSR1 while the log's directory is gone (renamed away): the writer keeps the old file,
    retries the path with back-off, and switches once the directory is back. No record is
    lost, memory does not grow meanwhile, the proxy keeps serving."""
    logs = tmp_path / "logs"
    logs.mkdir()
    path = logs / "access.log"
    gw = start_gateway(base_config(clients=JOB_CLIENTS, log={"access": str(path)}), env=JOB_ENV)
    count, size = LOG_FLOOD
    profile_flood(gw, count, size, seed=1)  # warm-up: the same traffic, while the file is fine
    well_behaved_get(gw, origin, "warm")
    wait_for(lambda: path.exists() and "/warm" in path.read_text(), "the warm-up records in the log file")
    base = Footprint(gw)
    rotated = tmp_path / "logs.rotated"
    os.rename(logs, rotated)  # the directory is gone from the configured path
    n = len(gw.events)
    gw.signal(signal.SIGUSR1)
    profile_flood(gw, count, size, seed=2)
    well_behaved_get(gw, origin, "during")
    print(f"vanished log directory: {count} records of {size} B; RSS +{base.grew_kib()} KiB over the warm "
          f"baseline {base.rss} KiB")
    base.assert_rss_within(16 * MiB, "records while the log path cannot be opened")
    failed = gw.wait_event("access_log_reopen_failed", after=n)
    assert failed["path"] == str(path), failed

    def old_file_records() -> list[dict]:
        return [json.loads(line) for line in (rotated / "access.log").read_text().splitlines()]

    # nothing lost: every record so far went to the old file
    wait_for(lambda: any(r["target"].endswith("/during") for r in old_file_records()), "/during in the old file",
             timeout=30)
    records = old_file_records()
    assert sum(1 for r in records if r["status"] == 403 and r["reason"] == "profile_not_allowed") == 2 * count
    logs.mkdir()  # the directory is back: the next retry opens the path
    gw.wait_event("access_log_reopened", after=n, timeout=20)
    well_behaved_get(gw, origin, "reopened")
    wait_for(lambda: path.exists() and "/reopened" in path.read_text(), "the record of /reopened in the new file")
    assert value(scrape(gw), "egressgate_log_dropped_total") == 0
    base.wait_fds_back("after the reopen")


# -------------------------------------------------------------------- 2. metric label values

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND", "MKCOL", "LOCK", "UNLOCK", "PURGE",
           "REPORT", "SEARCH", "COPY", "MOVE", "LINK", "MKCALENDAR", "SUBSCRIBE", "CONNECT"]


def label_flood(gw, rng: random.Random, count: int, size: int) -> None:
    """``count`` requests with client-chosen profile names (header or ``user+profile``, at
    random) of up to ``size`` bytes and random methods; every one is refused."""
    for i in range(count):
        method = rng.choice(METHODS)
        profile = name_of(rng, rng.randint(1, size))
        target = "denied.example:443" if method == "CONNECT" else f"http://denied.example/l{i}"
        lines = [f"{method} {target} HTTP/1.1", "Host: denied.example"]
        if rng.random() < 0.5:
            lines.append(f"X-Egressgate-Profile: {profile}")
        else:
            token = base64.b64encode(f"job+{profile}:{SECRET}".encode()).decode()
            lines.append(f"Proxy-Authorization: Basic {token}")
        if method in ("POST", "PUT", "PATCH"):
            lines.append("Content-Length: 0")
        status = refused(gw, ("\r\n".join(lines) + "\r\n\r\n").encode())
        assert status == 403, (status, method)


def test_client_chosen_names_never_become_label_values(start_gateway, origin):
    """Random profile names (``X-Egressgate-Profile`` and ``user+profile``, up to 16 KiB) and
    random methods: after a first round has created every series such requests can make, a
    second, larger round adds none and /metrics stays the same size."""
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    cfg = base_config(clients=JOB_CLIENTS, egress={"default": {"direct": {}}, "spare": {"direct": {}}})
    gw = start_gateway(cfg, env=JOB_ENV)
    well_behaved_get(gw, origin, "warm")
    label_flood(gw, rng, 600, 16 * 1024)  # every (client, method, status) combination shows up here;
    # and the allocator reaches its working size for this traffic
    first = scrape(gw)
    base = Footprint(gw)
    label_flood(gw, rng, 600, 16 * 1024)
    well_behaved_get(gw, origin, "during")
    second = scrape(gw)
    a, b = series(first), series(second)
    new = sorted(set(b) - set(a))
    print(f"label flood: series {len(a)} -> {len(b)}; /metrics {len(first)} -> {len(second)} bytes; "
          f"RSS +{base.grew_kib()} KiB")
    assert not new, f"{len(new)} new series, e.g. {[n[:120] for n in new[:3]]}"
    assert len(b) == len(a)
    assert len(second) < len(first) + 4096  # (values grow by a digit or two)
    for key in b:
        assert len(key) < 400, f"an oversized series: {key[:200]}..."
    # what the refusals were counted as: configured names or "-", never the names sent
    assert value(second, "egressgate_requests_total", client="anon", profile="-", status="403") > 0
    assert value(second, "egressgate_requests_total", client="job", profile="-", status="403") > 0
    assert value(second, "egressgate_requests_total", method="OTHER") > 0
    base.assert_rss_within(16 * MiB, "a flood of client-chosen profile names")
    # the access log still names what was asked for (it is the place to look)
    # the record names the refused profile, clipped: client-chosen text is bounded everywhere
    assert any(rec.get("reason") == "profile_not_allowed" and 60 < len(rec.get("profile", "")) < 100
               for rec in gw.log)


# --------------------------------------------------------------------------- 3. admin listener

def admin_address(gw) -> tuple[str, int]:
    host, port = gw.started_event["admin"].rsplit(":", 1)
    return host, int(port)


def closed_by_peer(sock: socket.socket) -> bool:
    """True when the other side closed (EOF or reset); never waits."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


def test_admin_connections_over_the_cap_are_closed_at_once(start_gateway, origin):
    """100 silent connections from one address to an admin listener with ``max_connections:
    16`` and ``max_connections_per_source: 8``: each new one past 8 closes the oldest silent
    one of that address (92 counted ``evicted``), the gateway holds no more than 8, the proxy
    keeps serving, and every descriptor is given back."""
    gw = start_gateway(base_config(admin={"idle_timeout": "60s", "max_connections": 16,
                                          "max_connections_per_source": 8}))
    assert admin_get(gw, "/healthz")[0] == 200
    well_behaved_get(gw, origin, "warm")  # (its pooled origin connection is part of the baseline)
    base = Footprint(gw)
    held = [socket.create_connection(admin_address(gw), timeout=5) for _ in range(100)]
    try:
        wait_for(lambda: sum(closed_by_peer(s) for s in held) >= 92, "92 connections over the share closed")
        assert sum(closed_by_peer(s) for s in held) == 92
        assert not any(closed_by_peer(s) for s in held[-8:])  # the newest 8 are kept
        assert gw.fd_count() <= base.fds + 8 + 2, f"{gw.fd_count() - base.fds} more descriptors held"
        well_behaved_get(gw, origin, "during-admin-flood")
    finally:
        for s in held:
            s.close()
    base.wait_fds_back("after the admin flood")
    text = scrape(gw)
    assert value(text, "egressgate_admin_connections_closed_total", reason="evicted") == 92
    assert value(text, "egressgate_admin_connections") == 1  # this scrape
    base.assert_rss_within(8 * MiB, "100 admin connections")


def _idle_admin_connections(gw, sources: list[str], each: int) -> list[socket.socket]:
    held = []
    for source in sources:
        for _ in range(each):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(5)
            s.bind((source, 0))
            s.connect(admin_address(gw))
            held.append(s)
    return held


def test_idle_admin_connections_never_starve_health_checks(start_gateway, origin):
    """Issue 25 item 7: 64 idle connections from one address (the default cap) made ``/readyz``
    fail 48 of 50 times. Now, idle connections from one address, or spread over 16 addresses
    so that together they fill ``admin.max_connections``, cannot make a probe fail: 50 of 50
    ``/readyz`` answer 200, each closing one idle connection to make room."""
    gw = start_gateway(base_config(admin={"idle_timeout": "60s"}))  # defaults: 64 in all, 8 per source
    assert admin_get(gw, "/readyz")[0] == 200
    for sources, each in ((["127.0.0.1"], 64), ([f"127.0.0.{i}" for i in range(2, 18)], 4)):
        held = _idle_admin_connections(gw, sources, each)
        try:
            statuses = [admin_get(gw, "/readyz", timeout=5)[0] for _ in range(50)]
            assert statuses.count(200) == 50, (sources[0], statuses)
        finally:
            for s in held:
                s.close()
    text = scrape(gw)
    assert value(text, "egressgate_admin_connections_closed_total", reason="max_connections") == 0
    assert value(text, "egressgate_admin_connections_closed_total", reason="evicted") > 0


def test_silent_and_slow_admin_clients_are_closed_at_the_timeout(start_gateway, origin):
    """With ``idle_timeout: 1s``: connections that send nothing, or send a request one byte
    every 100 ms (never finishing in time), are closed by the gateway and counted; hostile
    but complete requests (an Upgrade, CONNECT, 200 pipelined scrapes) get one answer each
    connection and raise nothing into the event loop."""
    gw = start_gateway(base_config(admin={"idle_timeout": "1s", "max_connections": 64,
                                          "max_connections_per_source": 64}))
    assert admin_get(gw, "/healthz")[0] == 200
    well_behaved_get(gw, origin, "warm")  # (its pooled origin connection is part of the baseline)
    base = Footprint(gw)
    silent = [socket.create_connection(admin_address(gw), timeout=5) for _ in range(10)]
    slow = socket.create_connection(admin_address(gw), timeout=5)
    request = b"GET /metrics HTTP/1.1\r\nHost: admin\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
    sent = 0
    pace = threading.Event()  # never set: its wait() paces the slow client's bytes
    try:
        for byte in request[:-4]:  # never the end of the head
            if closed_by_peer(slow):
                break
            try:
                slow.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            pace.wait(0.1)
        assert sent < len(request) - 4, "the slow client was never cut off"
        wait_for(lambda: all(closed_by_peer(s) for s in silent), "every silent admin connection closed")
        well_behaved_get(gw, origin, "during-slow-admin")
    finally:
        for s in [*silent, slow]:
            s.close()
    base.wait_fds_back("after the silent and slow admin clients")
    for hostile in (b"GET /healthz HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
                    b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 200):
        answer = raw_exchange("{}:{}".format(*admin_address(gw)), hostile, timeout=10)
        assert answer.count(b"HTTP/1.1 ") == 1, answer[:300]
    text = scrape(gw)
    assert value(text, "egressgate_admin_connections_closed_total", reason="idle_timeout") >= 11
    assert value(text, "egressgate_internal_errors_total") == 0, [
        e for e in gw.events if e.get("event") == "internal_error"][:2]
    base.assert_rss_within(8 * MiB, "silent and slow admin clients")


# ------------------------------------------------------------------------------------ 4. workers

def worker_metrics(sock_path: str) -> str:
    """A worker's own exposition, from its private admin socket."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(sock_path)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: w\r\n\r\n")
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    return data.partition(b"\r\n\r\n")[2].decode()


def requests_total(text: str) -> float:
    return value(text, "egressgate_requests_total")


def proc_state(pid: int) -> str | None:
    """The process's state letter (``Z`` for a zombie), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_killed_worker_is_reaped_logged_restarted_and_counted(start_gateway, origin):
    with ReservedPort() as port:
        gw = start_gateway(base_config(listen=[{"address": port.address}], workers=2))
        wait_for(lambda: any(e.get("event") == "started" and e.get("worker") == 1 for e in gw.events),
                 "worker 1's started event")
    first = next(e for e in gw.events if e.get("event") == "started" and e.get("worker") == 1)
    victim, sock_path = first["pid"], first["admin_socket"]
    sockdir = os.path.dirname(sock_path)
    # traffic until worker 1 has served some of it (SO_REUSEPORT spreads connections)
    for i in range(200):
        well_behaved_get(gw, origin, f"w{i}")
        if i >= 20 and requests_total(worker_metrics(sock_path)) > 0:
            break
    served_by_victim = requests_total(worker_metrics(sock_path))
    assert served_by_victim > 0
    before = requests_total(scrape(gw))
    base = Footprint(gw)  # worker 0
    victim_fds = len(os.listdir(f"/proc/{victim}/fd"))

    n = len(gw.events)
    os.kill(victim, signal.SIGKILL)
    exited = gw.wait_event("worker_exited", after=n)
    assert (exited["worker"], exited["pid"], exited["signal"]) == (1, victim, signal.SIGKILL), exited
    assert "SIGKILL" in exited["status"]
    wait_for(lambda: proc_state(victim) is None, f"the dead worker {victim} reaped (state {proc_state(victim)})")
    # a concurrent client is served while worker 1 is down or starting
    well_behaved_get(gw, origin, "while-restarting")
    # merged counters never go backwards, even before the new worker answers
    assert requests_total(scrape(gw)) >= before + 1
    restarted = wait_for(lambda: next((e for e in gw.events[n:] if e.get("event") == "started"
                                       and e.get("worker") == 1), None), "worker 1 started again", timeout=20)
    fresh = restarted["pid"]
    assert fresh != victim and restarted["listen"] == [port.address]
    # a fresh interpreter: it inherited none of worker 0's descriptors
    assert len(os.listdir(f"/proc/{fresh}/fd")) <= victim_fds + 2
    ready = json.loads(admin_get(gw, "/readyz")[1])
    assert ready["ready"] and ready["workers"] == {"expected": 2, "live": 2}, ready
    workers = json.loads(admin_get(gw, "/status")[1])["workers"]
    slot = next(w for w in workers["workers"] if w["index"] == 1)
    assert slot["pid"] == fresh and slot["restarts"] == 1 and slot["alive"], slot
    assert slot["last_exit"]["signal"] == signal.SIGKILL, slot
    for i in range(20):
        well_behaved_get(gw, origin, f"after{i}")
    text = scrape(gw)
    assert requests_total(text) >= before + 21, (before, requests_total(text))
    assert value(text, "egressgate_worker_restarts_total") == 1
    assert value(text, "egressgate_workers", state="live") == 2
    base.wait_fds_back("worker 0 after the restart")
    base.assert_rss_within(8 * MiB, "worker 0 across a worker's death and restart")

    # the new worker still dies with worker 0, and nothing is left behind on a normal exit
    gw.signal(signal.SIGTERM)
    assert gw.wait(timeout=40) == 0
    wait_for(lambda: proc_state(fresh) is None, f"the restarted worker {fresh} gone with worker 0")
    assert not os.path.exists(sockdir), f"the workers' socket directory was left behind: {os.listdir(sockdir)}"


def _two_workers_and_worker_1_killed(start_gateway):
    """A gateway with ``workers: 2`` whose worker 1 was just killed: (gateway, event index, its pid)."""
    with ReservedPort() as port:
        gw = start_gateway(base_config(listen=[{"address": port.address}], workers=2))
        wait_for(lambda: any(e.get("event") == "started" and e.get("worker") == 1 for e in gw.events),
                 "worker 1's started event")
    victim = next(e for e in gw.events if e.get("event") == "started" and e.get("worker") == 1)["pid"]
    n = len(gw.events)
    os.kill(victim, signal.SIGKILL)
    return gw, n, victim


def test_restarted_worker_dies_with_a_killed_worker_0(start_gateway, origin):
    gw, n, victim = _two_workers_and_worker_1_killed(start_gateway)
    fresh = wait_for(lambda: next((e["pid"] for e in gw.events[n:] if e.get("event") == "started"
                                   and e.get("worker") == 1), None), "worker 1 started again", timeout=20)
    well_behaved_get(gw, origin, "two-workers-again")
    os.kill(gw.pid, signal.SIGKILL)
    gw.wait(timeout=10)
    wait_for(lambda: proc_state(fresh) in (None, "Z"), f"the restarted worker {fresh} gone with worker 0",
             timeout=30)


def test_reload_while_a_worker_starts_neither_kills_nor_skips_it(start_gateway, origin):
    """SIGHUP reaches a restarted worker while its interpreter is still starting (the default
    action of SIGHUP is to exit): the worker survives and applies the reload once it runs."""
    gw, n, victim = _two_workers_and_worker_1_killed(start_gateway)
    restarted = gw.wait_event("worker_restarted", after=n)
    gw.signal(signal.SIGHUP)  # the new worker is importing now
    fresh = restarted["pid"]
    started = wait_for(lambda: next((i for i, e in enumerate(gw.events) if i >= n and e.get("event") == "started"
                                     and e.get("pid") == fresh), None), "the restarted worker's started event",
                       timeout=20)
    wait_for(lambda: any(e.get("event") == "reloaded" and e.get("worker") == 1 for e in gw.events[started:]),
             "the restarted worker applied the reload it got while starting")
    exits = [e for e in gw.events[n:] if e.get("event") == "worker_exited"]
    assert [e["pid"] for e in exits] == [victim], exits
    assert proc_state(fresh) not in (None, "Z")
    well_behaved_get(gw, origin, "after-early-reload")


# --------------------------------------------------------------------- 5. the egress prober

def test_a_blackholed_echo_service_does_not_stop_the_prober(start_gateway, origin):
    """The echo service's connects hang until ``timeouts.upstream_connect``, check after check:
    each check fails and is reported, the prober keeps checking every ``probe.retry`` (a
    timeout handled by two timers once escaped as a cancellation and ended it for good), the
    attested profile refuses its traffic, the others serve."""
    hole = Blackhole()
    try:
        cfg = base_config(egress={"default": {"direct": {}},
                                  "pinned": {"direct": {}, "expect_ip": ["203.0.113.10"]}},
                          clients=[{"name": "job", "from": ["127.0.0.0/8"], "egress": ["default", "pinned"]}],
                          probe={"echo_url": f"http://{hole.address}/ip", "retry": "0.2s"},
                          timeouts={"upstream_connect": "0.3s"})
        gw = start_gateway(cfg)
        well_behaved_get(gw, origin, "warm")  # (its pooled origin connection is part of the baseline)
        base = Footprint(gw)
        wait_for(lambda: len([e for e in gw.events if e.get("event") == "egress_ip_check_failed"]) >= 4,
                 "four failed egress checks in a row (the prober keeps going)", timeout=20)
        failed = [e for e in gw.events if e.get("event") == "egress_ip_check_failed"]
        assert all(e["profile"] == "pinned" and "timed out" in (e["error"] or "") for e in failed), failed[:2]
        refused = raw_exchange(gw.address, f"GET {origin.url('/p')} HTTP/1.1\r\nHost: x\r\n"
                                           "X-Egressgate-Profile: pinned\r\n\r\n".encode(), read_until_close=False)
        assert refused.startswith(b"HTTP/1.1 503") and b"destination_unavailable" in refused, refused[:300]
        well_behaved_get(gw, origin, "default-profile")
        text = scrape(gw)
        assert value(text, "egressgate_internal_errors_total") == 0
        assert value(text, "egressgate_egress_profile_serving", profile="pinned") == 0
        base.wait_fds_back("after the failed checks", slack=1)  # (one check may be dialing)
        base.assert_rss_within(8 * MiB, "checks against a blackholed echo service")
    finally:
        hole.close()
