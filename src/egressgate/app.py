"""The composition root: configuration in, object graph out. Everything else receives what
it needs as arguments; this is the only module that knows how the parts fit together."""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml

from . import build_kind
from .admin.server import AdminConnections, AdminProtocol, readiness
from .egress.failover import Failover
from .egress.plan import refusing
from .errors import ConfigError
from .fleet.checks import SharedChecks
from .fleet.ledger import Ledger
from .fleet.member import Member
from .fleet.owner import Owner
from .fleet.source import RATE_SLACK, Fleet
from .model import parse_socket_address
from .observe.accesslog import AccessLog, log_event
from .observe.merge import Merger
from .observe.metrics import Metrics
from .proxy.build import EMBEDDED, load_runtime, load_runtime_text, make_resolver
from .proxy.runtime import Runtime
from .proxy.server import Gateway, adopt_checks
from .proxy.session import ClientConnection
from .services.checks import Verifier, publish
from .services.keysource import KeySources
from .services.probe import Attestor
from .services.receiptdesk import ReceiptDesk, write_shared_key
from .services.watch import ConfigWatcher, watch
from .services.workers import REAP_EVERY, STARTUP_BLOCKED, Supervisor, WorkerTable, die_with_parent

# Every top-level config key is applied by a reload except these, which a reload refuses by
# name when they change (tests/unit/test_reload_keys.py keeps this list complete).
RESTART_KEYS = ("workers", "fleet")
LIVE_KEYS = ("listen", "admin", "egress", "clients", "security", "forwarding", "timeouts", "limits", "drain", "log",
             "probe", "dns", "reload", "receipts")


def _admin_token(admin, source: str) -> str | None:
    """The bearer token in force, read at start and at every reload. The loader has checked a
    named file; one that vanished or emptied since fails the start or the reload (never an
    admin listener left open by accident)."""
    if admin.token_file:
        try:
            token = Path(admin.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{source}:0: admin.token_file: cannot read {admin.token_file}: {exc}"]) from None
        if not token:
            raise ConfigError([f"{source}:0: admin.token_file: {admin.token_file} is empty"])
        return token
    return admin.token or (os.environ.get(admin.token_env) if admin.token_env else None)


class App:
    """A running gateway: proxy listeners, admin listener, probe loop, signals.

    With ``workers: N`` the first process (worker 0) also owns the admin listener, supervises
    the other workers (``supervisor``: restarts a worker that dies) and passes SIGHUP / SIGTERM /
    SIGUSR1 (and admin reloads, and reloads by ``reload.watch``: ``watcher``) on to them.
    """

    def __init__(self, path: str | None, runtime: Runtime, worker: int = 0,
                 supervisor: Supervisor | None = None, sockdir: str | None = None) -> None:
        self.path = path
        self.worker = worker
        self.supervisor = supervisor
        self.sockdir = sockdir  # private admin sockets of workers > 0 (metrics merging)
        self.metrics = Metrics()
        cfg = runtime.config
        self._set_names(runtime)
        self.access_log = AccessLog(cfg.log.access, cfg.log.format, max_queue=cfg.log.max_queue,
                                    full_targets=cfg.log.full_targets)
        self._log_dropped_before: dict[str, int] = {}  # by access logs a reload replaced
        self.metrics.watch_access_log(self._log_stats)
        self.worker_table = WorkerTable(supervisor)
        self.merger = Merger()
        self.admin_conns = AdminConnections()
        if supervisor is not None:
            supervisor.on_restart = self.metrics.worker_restarts.inc
        self.metrics.workers.labels("expected").set(self.worker_table.snapshot()["expected"])
        self.metrics.workers.labels("live").set_function(lambda: self.worker_table.snapshot()["live"])
        self._supervising: asyncio.Task | None = None
        self.loop = asyncio.get_running_loop()
        resolver = make_resolver(cfg)
        self.gateway = Gateway(runtime, self.metrics, self.access_log, resolver, self.loop, ClientConnection,
                               reuse_port=cfg.workers > 1)
        self.admin_server: asyncio.base_events.Server | None = None
        self.admin_address: str | None = None  # the configured admin address in force
        self.admin_token: str | None = None
        gateway = self.gateway
        self.keys = KeySources(lambda: gateway.connector.reach, self.metrics,
                               lambda: gateway.runtime.timeouts.upstream_connect)
        runtime.clients.keys = self.keys
        self.metrics.ready.set_function(lambda: 0 if readiness(gateway) else 1)
        self.stopped = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._prober: asyncio.Task | None = None
        self.watcher = ConfigWatcher(path, runtime.config_hash) if path is not None and worker == 0 else None
        self._watching: asyncio.Task | None = None
        self.attestor = Attestor(self.gateway, worker)
        self.gateway.on_reload.append(lambda old, new: self.attestor.wake())
        self.desk: ReceiptDesk | None = None  # job receipts (receiptdesk), when receipts are on
        if cfg.receipts.enabled:
            self.desk = ReceiptDesk(cfg.receipts, path or EMBEDDED, worker, sockdir, self._peers,
                                    lambda: gateway.runtime)
            gateway.outcomes.tallies = self.desk.tallies
            gateway.dispatcher.receipts = self.desk
        self.private_server: asyncio.base_events.Server | None = None  # worker 0's private socket
        self.check_store = self._check_store()
        self.verifier = Verifier(lambda: gateway.runtime, lambda: gateway.connector.reach, self._publish_checks,
                                 self.attestor.attest, log=worker == 0, on_error=gateway.internal_error,
                                 held=gateway.protect.hold_on, observed=gateway.blocks.checked,
                                 shared=SharedChecks(self.check_store) if self.check_store is not None else None,
                                 on_failover=self._failed_over)
        # switch: auto decides on failovers after every egress-IP round too, not only provider rounds
        self.attestor.after = self._after_attestation
        self._verifying: asyncio.Task | None = None
        self.gateway.on_reload.append(lambda old, new: self.verifier.wake(everything=True))
        self.loop.set_exception_handler(self._loop_exception)
        self.fleet = self._fleet()

    def _check_store(self):
        """With a fleet store, every process of the fleet shares provider checks through it
        (``fleet.checks``): this process's own connection, used about once per interval."""
        cfg = self.gateway.runtime.config.fleet
        if cfg.redis is None:
            return None
        from .fleet.redisstore import RedisStore  # (redis is imported only when configured)

        return RedisStore(cfg.redis, f"{socket.gethostname()}:{os.getpid()}")

    def _fleet(self) -> Owner | Member | None:
        """``workers: N``: worker 0 owns the instance's shared-IP budgets and holds, the other
        workers lease from it (``fleet``); the guard of each admits from its slices. With a
        fleet store (``fleet.redis``) worker 0 holds the instance's share of the fleet's."""
        cfg = self.gateway.runtime.config.fleet
        if self.sockdir is None and cfg.redis is None:
            return None
        guard = self.gateway.protect
        path = f"{self.sockdir}/owner.sock" if self.sockdir is not None else None
        on_error = self.gateway.internal_error
        blocks = self.gateway.blocks
        # a block state names the member's public IP: another VM's member has its own address
        blocks.public_ip = lambda profile, member: self._attested(profile, member)
        blocks.member_for = lambda profile, ip: self._member_at(profile, ip)
        if self.worker != 0:
            member = Member(path, self.worker, guard.reclaim, guard.apply_hold, guard.stale_tokens, on_error)
            guard.budget = member
            member.on_block, blocks.share = blocks.shared, member.block_learned  # block states, every worker alike
            return member
        ledger = Ledger(self.loop.time)
        owner = Owner(path, ledger, guard.reclaim, guard.apply_hold, guard.stale_tokens, on_error)
        if cfg.redis is not None:
            from .fleet.redisstore import RedisStore  # (redis is imported only when configured)

            instance = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
            owner.source = Fleet(RedisStore(cfg.redis, instance), ledger, self.loop.time, cfg.fallback,
                                 cfg.fallback_instances, cfg.redis.lease_ttl, owner.fleet_hold, owner.give_back_idle,
                                 self.metrics, on_error)
            owner.source.apply_block = owner.fleet_block  # block states other instances found
            self.metrics.fleet_rate_slack.set(RATE_SLACK)
        guard.budget = owner
        owner.on_block, blocks.share = blocks.shared, owner.block_learned
        return owner

    def _attested(self, profile: str, member: str) -> str | None:
        """The public IP the egress-IP check saw for ``member`` of ``profile`` (None: unchecked)."""
        pool = self.gateway.runtime.profiles.get(profile)
        plan = next((m for m in pool.members if m.label == member), None) if pool is not None else None
        return pool.attested_ip(plan) if plan is not None else None

    def _member_at(self, profile: str, ip: str) -> str | None:
        """The member of ``profile`` whose egress-IP check saw ``ip`` (None: none here)."""
        pool = self.gateway.runtime.profiles.get(profile)
        return next((m.label for m in pool.members if pool.attested_ip(m) == ip), None) if pool is not None else None

    def _publish_checks(self, rt: Runtime) -> None:
        """Export the provider results and which members carry traffic, of the runtime in force."""
        if rt is self.gateway.runtime:
            publish(self.metrics, rt)
            self.gateway.publish_egress(rt)

    def _after_attestation(self, rt: Runtime) -> None:
        """After a round of egress-IP checks: switch: auto decides on failovers then too (a
        profile with expect_ip and no provider has no provider rounds), and a pending verified
        switch waiting for an attestation is tried again."""
        self.verifier.steer(rt)
        self._publish_checks(rt)
        if rt.providers.pending:
            self.verifier.wake()

    def _failed_over(self, made: Failover) -> None:
        """A ``switch: auto`` profile moved its new connections to a standby (every worker decides
        alone; worker 0 logs the event, and its counter stands for the instance)."""
        self.metrics.egress_failover.labels(made.profile).inc()
        if self.worker == 0:
            log_event("egress_failover", **made.event())

    def _peers(self) -> list[tuple[int, str]]:
        """(index, private admin socket) of every other worker of this gateway."""
        if self.sockdir is None:
            return []
        if self.worker == 0:
            return self.worker_table.sockets()
        count = self.gateway.runtime.config.workers
        return [(i, f"{self.sockdir}/w{i}.sock") for i in range(count) if i != self.worker]

    def _set_names(self, runtime: Runtime) -> None:
        """The only client and profile names metrics may carry as labels (others: ``-``)."""
        cfg = runtime.config
        # a service account listed by name is counted under it; one matched by "namespace/*" as "-"
        accounts = (a for c in cfg.clients if c.kubernetes for a in c.kubernetes.service_accounts if "*" not in a)
        self.metrics.set_names([*(c.name for c in cfg.clients), *accounts], cfg.egress)

    def _log_stats(self) -> tuple[dict[str, int], int]:
        now = self.access_log.dropped()
        total = {k: now.get(k, 0) + self._log_dropped_before.get(k, 0) for k in now.keys() | self._log_dropped_before}
        return total, self.access_log.queued_bytes()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """Whatever still reaches the event loop (a callback outside a connection): counted
        as ``internal_errors_total{where="loop"}`` and logged, never silent."""
        exc = context.get("exception")
        if exc is None:
            exc = RuntimeError(str(context.get("message", "event loop error")))
        self.gateway.internal_error("loop", exc)

    async def start(self, admin: bool = True, signals: bool = True) -> None:
        # Attested profiles serve only once checked: check their members before the listeners
        # open, so a start is not a burst of 503s (bounded by timeouts.upstream_connect).
        rt = self.gateway.runtime
        await self.attestor.attest(rt, {m for pool in rt.profiles.values() if pool.attest for m in pool.everyone})
        self.keys.prefetch([c.token for c in rt.clients.clients if c.token is not None])
        if isinstance(self.fleet, Owner):
            await self.fleet.start()  # (before the listeners: a worker's first lease finds it)
        elif self.fleet is not None:
            self.fleet.start()
        await self.gateway.start()
        admin_cfg = self.gateway.runtime.config.admin
        if admin and admin_cfg.address:
            self.admin_token = _admin_token(admin_cfg, self.path or EMBEDDED)
            self.admin_server = await self._bind_admin(admin_cfg.address)
            self.admin_address = admin_cfg.address
            await self.admin_server.start_serving()
        elif self.worker and self.sockdir:
            self.admin_server = await self._private_socket()
        if self.worker == 0 and self.sockdir:  # (the other workers ask worker 0 for its receipt tallies)
            self.private_server = await self._private_socket()
        # What this process really listens on: worker 0 the admin TCP address, a worker > 0
        # only its private Unix socket (a path, not a host and port).
        admin_bound = admin_socket = None
        self._note_admin()
        if self.admin_server is not None:
            name = self.admin_server.sockets[0].getsockname()
            if isinstance(name, tuple):
                host, port = name[:2]
                admin_bound = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            else:
                admin_socket = name.decode(errors="replace") if isinstance(name, bytes) else name
        self._prober = self.loop.create_task(self.attestor.run())  # every worker attests for itself
        self._verifying = self.loop.create_task(self.verifier.run())  # provider checks, likewise
        if self.supervisor is not None:
            self._supervising = self.loop.create_task(self._supervise())
        if self.watcher is not None:
            self._watching = self.loop.create_task(watch(
                self.watcher, lambda: self.gateway.runtime.config.reload, self._reload_quietly,
                lambda exc: self.gateway.internal_error("watch", exc)))
        extra = {"admin_socket": admin_socket} if admin_socket is not None else {}
        if signals:
            self.install_signals()  # before "started": a SIGTERM right after it must drain, not kill
        log_event("started", worker=self.worker, listen=self.gateway.listeners.bound_addresses(), admin=admin_bound,
                  **extra, pid=os.getpid(), config=self.gateway.runtime.source,
                  hash=self.gateway.runtime.config_hash[:12], build=build_kind())

    async def _private_socket(self) -> asyncio.base_events.Server:
        """This worker's private admin socket: its /metrics and receipt tallies, for the others."""
        path = f"{self.sockdir}/w{self.worker}.sock"
        try:
            os.unlink(path)  # left by a worker that died in this slot
        except FileNotFoundError:
            pass
        return await self.loop.create_unix_server(
            lambda: AdminProtocol(self.gateway, None, lambda: None, self.admin_conns, metrics_only=True,
                                  receipts=self.desk), path)

    def _note_admin(self) -> None:
        """Tell the gateway where the admin listener is: it is never a destination."""
        sockets = self.admin_server.sockets if self.admin_server is not None else ()
        self.gateway.listeners.admin_sockets = [s.getsockname()[:2] for s in sockets if isinstance(s.getsockname(), tuple)]
        self.gateway.listeners.refresh_own()

    def _admin_bound(self) -> str | None:
        """The admin address really bound (a configured port 0 becomes the kernel's choice)."""
        for sock in self.admin_server.sockets if self.admin_server is not None else ():
            name = sock.getsockname()
            if isinstance(name, tuple):
                host, port = name[:2]
                return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return None

    async def _bind_admin(self, address: str) -> asyncio.base_events.Server:
        host, port = parse_socket_address(address)
        return await self.loop.create_server(
            lambda: AdminProtocol(self.gateway, self.reload, lambda: self.admin_token, self.admin_conns,
                                  self.worker_table, self.merger, receipts=self.desk), host, port,
            start_serving=False)

    async def _supervise(self) -> None:
        """Worker 0: reap workers that died, log them, restart them (with back-off)."""
        while True:
            try:
                self.supervisor.tick()
            except Exception as exc:  # the supervisor must never stop
                self.gateway.internal_error("workers", exc)
            await asyncio.sleep(REAP_EVERY)

    async def reload(self, text: bytes | None = None) -> None:
        """Apply the config file again, every key of it, or nothing: keys that cannot change
        in a running process are refused by name, and everything that can fail (binding
        listeners, loading certificates, opening the access log) happens before anything
        is swapped. The old configuration stays in force on any error. ``text``: the file's
        content as the watcher read it, skipped if a reload read that very content meanwhile."""
        async with self._reload_lock:
            if text is not None and self.watcher is not None and not self.watcher.is_new(text):
                return
            try:
                if self.watcher is not None:
                    text = text if text is not None else await self.loop.run_in_executor(None, self.watcher.read)
                    self.watcher.note(text)
                runtime, text = await self.loop.run_in_executor(None, load_runtime_text, self.path, text)
                _refuse_empty(text, self.path or EMBEDDED)
                self._refuse_dropping_every_listener(runtime)
                await self._apply(runtime)
            except ConfigError as err:
                self.metrics.reloads.labels("failure").inc()
                self.metrics.reload_ok.set(0)
                log_event("reload_failed", config=self.path or EMBEDDED, errors=err.errors)
                raise
            self.metrics.reloads.labels("success").inc()
            self.metrics.reload_ok.set(1)
            if self.supervisor is not None:
                self.supervisor.config_text = text  # a restarted worker starts with what is in force
            # a reload whose result leaves a profile refusing all its traffic says so
            dark = refusing(self.gateway.runtime.profiles)
            log_event("reloaded", worker=self.worker, config=self.path or EMBEDDED, hash=runtime.config_hash[:12],
                      **({"refusing": dark} if dark else {}))
            self._tell_children(signal.SIGHUP)

    def _refuse_dropping_every_listener(self, runtime: Runtime) -> None:
        """A reload keeps at least one listener in force (its configured or bound address): a
        file that would replace every one of them (a truncated file, another host's config) is
        refused, so a bad write never leaves the proxy port refusing connections. Moving every
        listener at once needs a restart."""
        old = {item.address for item in self.gateway.runtime.config.listen}
        old |= set(self.gateway.listeners.bound_addresses())
        new = [item.address for item in runtime.config.listen]
        if old and not old.intersection(new):
            source = self.path or EMBEDDED
            raise ConfigError([f"{source}:0: listen: the new config keeps none of the listeners in force "
                               f"({', '.join(sorted(old))}); moving every listener at once needs a restart "
                               "(the running config stays in force)"])

    async def _apply(self, runtime: Runtime) -> None:
        old, new = self.gateway.runtime.config, runtime.config
        source = self.path or EMBEDDED
        restart = [key for key in RESTART_KEYS if getattr(old, key) != getattr(new, key)]
        if restart:
            raise ConfigError([f"{source}:0: {key}: changing it needs a restart (the running value stays in force)"
                               for key in restart])
        # 1. Prepare everything that can fail.
        change = await self.gateway.listeners.prepare(runtime)
        admin_server = None
        access_log = None
        try:
            if self.worker == 0 and self.admin_server is not None and new.admin.address not in (
                    self.admin_address, self._admin_bound()):
                if new.admin.address is None:
                    raise ConfigError([f"{source}:0: admin.address: turning the admin listener off needs a restart"])
                try:
                    admin_server = await self._bind_admin(new.admin.address)
                except OSError as exc:
                    raise ConfigError([f"{source}:0: admin.address: cannot listen on {new.admin.address}: "
                                       f"{exc.strerror or exc}"]) from None
            elif self.worker == 0 and self.admin_server is None and new.admin.address is not None \
                    and old.admin.address is None:
                raise ConfigError([f"{source}:0: admin.address: turning the admin listener on needs a restart"])
            token = _admin_token(new.admin, source)
            if old.receipts.enabled != new.receipts.enabled:
                raise ConfigError([f"{source}:0: receipts.enabled: turning receipts "
                                   f"{'on' if new.receipts.enabled else 'off'} needs a restart"])
            receipt_key = self.desk.prepare(new.receipts, source) if self.desk is not None else None
            if old.log != new.log:
                try:
                    access_log = AccessLog(new.log.access, new.log.format, max_queue=new.log.max_queue,
                                           full_targets=new.log.full_targets)
                except OSError as exc:
                    raise ConfigError([f"{source}:0: log.access: cannot open {new.log.access}: "
                                       f"{exc.strerror or exc}"]) from None
        except BaseException:
            change.abandon()
            if admin_server is not None:
                admin_server.close()
            raise
        # Members that are new or moved are checked before they carry traffic, so a profile
        # moved to a new IP serves from it at once (or refuses, if the IP is wrong).
        adopt_checks(self.gateway.runtime, runtime)
        await self.attestor.attest(runtime, {m for pool in runtime.profiles.values() if pool.attest for m in pool.unchecked()})
        # switch: verified -- new members carry traffic only once every provider accepts them
        runtime.providers.adopt(self.gateway.runtime.providers, runtime.profiles)
        await self.verifier.gate_switches(self.gateway.runtime, runtime)
        # 2. Commit: nothing below can fail.
        # (the names first: apply publishes per-profile gauges, and requests under the new
        # runtime may be counted while it awaits)
        self._set_names(runtime)
        runtime.clients.keys = self.keys
        runtime.clients.adopt(self.gateway.runtime.clients)  # known credentials stay known
        self.keys.prefetch([c.token for c in runtime.clients.clients if c.token is not None])
        await self.gateway.apply(runtime, change)
        if (old.dns, old.timeouts.dns) != (new.dns, new.timeouts.dns):
            self.gateway.connector.resolver = make_resolver(new)
        self.admin_token = token
        if self.desk is not None:
            self.desk.commit(new.receipts, receipt_key)
        if admin_server is not None:
            self.admin_server.close()
            self.admin_server, self.admin_address = admin_server, new.admin.address
            await admin_server.start_serving()
            self._note_admin()
        if access_log is not None:
            previous, self.access_log = self.access_log, access_log
            self.gateway.outcomes.access_log = access_log
            previous.close(wait=0)  # its thread writes what it holds and ends; never block the loop
            for reason, n in previous.dropped().items():
                self._log_dropped_before[reason] = self._log_dropped_before.get(reason, 0) + n

    def _tell_children(self, sig: int) -> None:
        if self.supervisor is not None:
            self.supervisor.signal_all(sig)

    def install_signals(self) -> None:
        loop = self.loop
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._reload_quietly()))
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(self.shutdown()))
        loop.add_signal_handler(signal.SIGINT, lambda: loop.create_task(self.shutdown()))
        loop.add_signal_handler(signal.SIGUSR1, self._reopen_logs)

    def _reopen_logs(self) -> None:
        self.access_log.reopen()
        self._tell_children(signal.SIGUSR1)

    async def _reload_quietly(self, text: bytes | None = None) -> None:
        try:
            await self.reload(text)
        except ConfigError:
            pass  # logged; the old config stays in force

    async def shutdown(self) -> None:
        if self.gateway.draining:
            return
        if self.supervisor is not None:
            self.supervisor.stop()  # a worker that exits now is not restarted
        self._tell_children(signal.SIGTERM)
        drain = self.gateway.runtime.config.drain
        await self.gateway.drain(drain.grace, drain.timeout)
        await self.close()
        self.stopped.set()

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
        for task in (self._supervising, self._watching, self._verifying):
            if task is not None:
                task.cancel()
        self.keys.close()
        await self.gateway.close()
        if self.fleet is not None:
            await self.fleet.close()
        if self.check_store is not None:
            await self.check_store.close()
        if self.admin_server is not None:
            self.admin_server.close()
        if self.private_server is not None:
            self.private_server.close()
        self.access_log.close()


async def serve(path: str | None, runtime: Runtime | None = None, worker: int = 0,
                supervisor: Supervisor | None = None, sockdir: str | None = None,
                reload_pending: Callable[[], bool] = lambda: False) -> int:
    runtime = runtime or load_runtime(path)
    app = App(path, runtime, worker, supervisor, sockdir)
    await app.start(admin=worker == 0)
    if reload_pending():  # a SIGHUP that came while this worker was starting
        app.loop.create_task(app._reload_quietly())
    _tune_gc()
    await app.stopped.wait()
    log_event("stopped", worker=worker)
    return 0


def _tune_gc() -> None:
    """Start-up objects never become garbage: freeze them out of the collector's way, and
    collect the young generation less often (a proxy allocates many short-lived objects,
    most freed by reference counting)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20000, 20, 20)


def _run_loop(coro) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep working without it
        return asyncio.run(coro)
    return uvloop.run(coro)


def _raise_fd_limit() -> None:
    """Each tunnel holds two descriptors: take the whole hard limit, not the soft default."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def _write_pidfile(pidfile: str) -> None:
    """This process's id in ``pidfile`` (written whole: a temporary file renamed over it)."""
    tmp = f"{pidfile}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, pidfile)


def _remove_pidfile(pidfile: str) -> None:
    """Remove ``pidfile`` if it still names this process (a successor may have replaced it)."""
    try:
        with open(pidfile) as f:
            if f.read().strip() == str(os.getpid()):
                os.unlink(pidfile)
    except OSError:
        pass


def run(path: str | None, pidfile: str | None = None) -> int:
    """Validate the config, start ``workers`` processes sharing the listeners (SO_REUSEPORT),
    keep them running (worker 0 restarts one that dies), and serve until SIGTERM has drained
    them all. The workers' socket directory is removed on the way out. With ``pidfile``, the id of
    this process (the one that takes SIGHUP, SIGUSR1 and SIGTERM) is written there once the config
    is valid, and removed on the way out."""
    runtime, text = load_runtime_text(path)
    _raise_fd_limit()
    if pidfile:
        _write_pidfile(pidfile)
    workers = runtime.config.workers
    supervisor = None
    sockdir = tempfile.mkdtemp(prefix="egressgate-workers-") if workers > 1 else None
    try:
        if sockdir is not None:
            if runtime.config.receipts.enabled:
                write_shared_key(sockdir)  # one receipt key for every worker (unless key_file names one)
            supervisor = Supervisor(path, workers, sockdir, text)
            supervisor.start_all()
        code = _run_loop(serve(path, runtime, 0, supervisor, sockdir))
    finally:
        if supervisor is not None:
            supervisor.stop()
            supervisor.signal_all(signal.SIGTERM)  # (already sent on a drain; not on a crash)
            drain = runtime.config.drain
            supervisor.wait_all(drain.grace + drain.timeout + 10.0)
        if sockdir:
            shutil.rmtree(sockdir, ignore_errors=True)
        if pidfile:
            _remove_pidfile(pidfile)
    return code


def run_worker(path: str | None, index: int, sockdir: str, parent: int) -> int:
    """A worker process started by worker 0 (see ``workers``): its configuration text comes on
    stdin, it dies with worker 0, and it serves like worker 0 minus the admin listener."""
    if not die_with_parent(parent):
        return 1
    pending: list[int] = []
    # Until the event loop's handlers are installed: remember a reload, ignore a log reopen
    # (the log is opened fresh), instead of the default action of both, which is to exit.
    # Worker 0 started this process with both blocked; a signal that came meanwhile is
    # delivered to these handlers now.
    signal.signal(signal.SIGHUP, lambda *_: pending.append(1))
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STARTUP_BLOCKED)
    text = sys.stdin.buffer.read()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    runtime, _ = load_runtime_text(path, text)
    _raise_fd_limit()
    return _run_loop(serve(path, runtime, index, None, sockdir, reload_pending=lambda: bool(pending)))


def _refuse_empty(text: bytes, source: str) -> None:
    """A reload never applies an empty file (or one of only comments): it would replace every
    listener, profile and client with the built-in defaults. A truncated write looks like this."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return  # (the loader reports it with its line)
    if doc is None or doc == {}:
        raise ConfigError([f"{source}:1: (file): the config is empty: a reload needs a complete config "
                           "(the running config stays in force)"])
