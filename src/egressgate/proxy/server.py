"""``Gateway``: what every connection of one worker shares, passed in explicitly (never
global): the runtime in force, and the pieces the connections use —

- ``listeners`` (``listeners.Listeners``): bound, TLS, swapped on reload;
- ``gate`` (``gate.Gate``): refused connections counted and logged;
- ``limits`` / ``auth`` (``limits``): per-client limits, the password and token check throttles;
- ``protect`` (``protect.SharedIpGuard``): shared-IP limits and holds per egress member;
- ``connector`` (``connector.Connector``): resolve, dial, pooled upstream connections;
- ``dispatcher`` (``dispatch.Dispatcher``): identify -> route -> connect, for each request;
- ``outcomes`` (``observe.outcomes``): records, metrics, recent denials;
- ``blocks`` (``blocks.BlockDesk``): each (member x provider)'s block state from live traffic;

and the lifecycle: the registry of open connections, the sweep that enforces timeouts,
reload (swap the whole ``Runtime``), drain and close. The admin server reads
``open_connections()``, a snapshot, never a connection's internals.

Reload swaps the whole ``Runtime`` at once: new requests see the new one, requests and
tunnels under way keep the one they started with. Listeners change all or nothing (see
``listeners``).

Drain (SIGTERM): not ready at once; keep accepting for ``drain.grace`` so the load balancer
notices; close the listeners; let requests and tunnels finish up to ``drain.timeout``;
then close what is left.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Callable
from typing import Protocol

from ..egress.resolver import Resolver
from ..observe.accesslog import AccessLog, log_event
from ..observe.metrics import INTERNAL_ERROR_SITES, Metrics
from ..observe.outcomes import Outcomes
from .blocks import BlockDesk
from .connector import Connector
from .dispatch import Dispatcher
from .gate import Gate
from .limits import AuthChecks, ClientLimits
from .listeners import ListenerChange, ListenerInfo, Listeners
from .protect import SharedIpGuard
from .runtime import Runtime


class OpenConnection(Protocol):
    """What the gateway needs of an open connection: its sweep, its end, its snapshot."""

    def tick(self, now: float, rt: Runtime) -> None: ...
    def teardown(self, reason: str, abort: bool = False) -> None: ...
    def crashed(self, where: str, exc: BaseException) -> None: ...
    def view(self, now: float) -> dict: ...


class Gateway:
    def __init__(self, runtime: Runtime, metrics: Metrics, access_log: AccessLog, resolver: Resolver,
                 loop: asyncio.AbstractEventLoop, connection: Callable[[Gateway, ListenerInfo], asyncio.Protocol],
                 reuse_port: bool = False) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.loop = loop
        self.outcomes = Outcomes(metrics, access_log)
        self.gate = Gate(metrics, loop.time)
        self.limits = ClientLimits(loop.time)
        self.auth = AuthChecks(loop)
        metrics.watch_auth(self.auth.stats)
        self.connector = Connector(loop, resolver, metrics, self.internal_error)
        self.listeners = Listeners(loop, metrics, lambda info: connection(self, info), reuse_port)
        self.protect = SharedIpGuard(loop.time)  # shared-IP limits and holds, across reloads
        metrics.watch_protect(self.protect.stats)
        self.dispatcher = Dispatcher(self.connector, self.limits, self.auth, self.outcomes, self.listeners,
                                     self.protect)
        self.blocks = BlockDesk(metrics)  # block states per (member x provider), across reloads (issue 30)
        self.dispatcher.blocks = self.blocks
        self.connections: set[OpenConnection] = set()
        self.draining = False
        self.started = time.time()
        self._sweeper: asyncio.Task | None = None
        self.on_reload: list[Callable[[Runtime, Runtime], None]] = []

    async def start(self) -> None:
        await self.listeners.commit(await self.listeners.prepare(self.runtime))
        self._publish(self.runtime)
        self._sweeper = self.loop.create_task(self._sweep())

    def internal_error(self, where: str, exc: BaseException) -> None:
        """A bug caught at a callback, task or timer boundary: counted and logged once."""
        self.metrics.internal_errors.labels(where if where in INTERNAL_ERROR_SITES else "other").inc()
        log_event("internal_error", where=where, error=repr(exc),
                  traceback="".join(traceback.format_exception(exc))[-4000:])

    def open_connections(self) -> list[dict]:
        """A snapshot of every open connection (``view``), oldest first."""
        now = self.loop.time()
        views = [conn.view(now) for conn in list(self.connections)]
        views.sort(key=lambda v: -v["age_seconds"])
        return views

    # --- sweep (timeouts) ---------------------------------------------------------------------
    def _sweep_interval(self, rt: Runtime) -> float:
        t = rt.timeouts
        return max(0.02, min(1.0, t.client_head / 4, t.client_idle / 4, t.upstream_response / 4,
                             t.tunnel_idle / 4, t.exchange_idle / 4))

    async def _sweep(self) -> None:
        while True:
            rt = self.runtime
            await asyncio.sleep(self._sweep_interval(rt))
            now = self.loop.time()
            for conn in list(self.connections):
                try:
                    conn.tick(now, rt)
                except Exception as exc:  # never let one connection stop the sweeper
                    conn.crashed("tick", exc)
            self.connector.pool.sweep(now, rt.timeouts.upstream_idle)

    # --- reload and drain ---------------------------------------------------------------------
    async def apply(self, new: Runtime, change: ListenerChange | None = None) -> None:
        """Swap in ``new`` (listeners prepared by ``listeners.prepare`` unless given)."""
        if change is None:
            change = await self.listeners.prepare(new)  # may raise: then nothing has changed
        old = self.runtime
        adopt_checks(old, new)
        self.runtime = new
        await self.listeners.commit(change)
        self.connector.pool.close_all()  # idle origin connections may use an old egress address
        self._publish(new)
        for hook in self.on_reload:
            hook(old, new)

    def _publish(self, rt: Runtime) -> None:
        m = self.metrics
        m.config_info.clear()
        m.config_info.labels(rt.config_hash).set(1)
        m.config_loaded.set(rt.loaded_at)
        m.egress_source_up.clear()
        self.blocks.adopt(rt.blocks, {name: [p.label for p in pool.members] for name, pool in rt.profiles.items()})
        for pool in rt.profiles.values():
            for plan in pool.members:
                self.connector.source_state(pool, plan, not pool.is_down(plan))
        self.publish_egress(rt)

    def publish_egress(self, rt: Runtime) -> None:
        m = self.metrics
        m.egress_ip_match.clear()
        m.egress_profile_serving.clear()
        m.egress_member_carrying.clear()
        for name, pool in rt.profiles.items():
            m.egress_ip_match.labels(name).set({True: 1, False: 0, None: -1}[pool.ip_matches])
            m.egress_profile_serving.labels(name).set(1 if pool.healthy else 0)
            if pool.kind == "direct":
                continue
            carrying = set(pool.carrying())
            for plan in pool.everyone:
                m.egress_member_carrying.labels(name, plan.label, pool.role(plan)).set(1 if plan in carrying else 0)

    async def drain(self, grace: float, timeout: float) -> None:
        self.draining = True
        log_event("drain_started", connections=len(self.connections), grace=grace, timeout=timeout)
        if grace > 0:
            await asyncio.sleep(grace)
        self.listeners.close()
        deadline = self.loop.time() + timeout
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = len(self.connections)
        for conn in list(self.connections):
            conn.teardown("drain_timeout")  # each unfinished request or tunnel: one record
        self.connector.pool.close_all()
        log_event("drain_finished", closed_unfinished=left)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.listeners.close()
        for conn in list(self.connections):
            conn.teardown("shutdown", abort=True)
        self.connector.pool.close_all()
        self.listeners.forget()
        self.auth.close()


def adopt_checks(old: Runtime, new: Runtime) -> None:
    """Carry egress-IP checks over to a new runtime for members that did not change."""
    for name, pool in new.profiles.items():
        previous = old.profiles.get(name)
        if previous is not None and previous is not pool:
            pool.adopt(previous)
