"""The egress connector: a routed request -> a connected ``Upstream``, through the route's
egress members in order.

- direct and ``bind`` profiles: an idle keep-alive connection from the pool (forwarded
  requests only), else a new connection to the judged addresses from the member's source
  address; a source address the host no longer has is marked down and the next member tried;
- ``upstream`` profiles: a connection to the chained proxy (kept alive and reused for
  forwarded requests) and, for CONNECT, a tunnel through it; an unreachable chained proxy is
  marked down and the next one tried.

Every new connection is ``egress.reach``'s (the one way out), with ``GUARD``: the route
judged the addresses already. Resolve and dial latencies and each member's state are
measured here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from ..egress.chain import TunnelRefused
from ..egress.dialer import Dialer, SourceUnavailable
from ..egress.plan import EgressPlan, ProfilePool
from ..egress.reach import JUDGED, Reach
from ..egress.resolver import Resolver
from ..egress.upstream import Upstream, UpstreamPool
from ..errors import UpstreamError
from ..model import UpstreamProxy
from ..observe.accesslog import log_event
from ..observe.metrics import Metrics
from .route import Route

GUARD = JUDGED  # the route judged the destination's addresses (policy.judge: guard and deny rules)


class Link:
    """A connection ready for a request: ``reused`` from the pool or new, through which egress
    member (``plan``: its attested IP goes into the record), ``chained`` through an upstream
    proxy (whose credentials a forwarded request carries), and the bytes a chained proxy sent
    after its CONNECT reply (``leftover``)."""

    __slots__ = ("upstream", "reused", "plan", "chained", "leftover")

    def __init__(self, upstream: Upstream, reused: bool, plan: EgressPlan, chained: UpstreamProxy | None = None,
                 leftover: bytes = b"") -> None:
        self.upstream = upstream
        self.reused = reused
        self.plan = plan
        self.chained = chained
        self.leftover = leftover


class Connector:
    def __init__(self, loop: asyncio.AbstractEventLoop, resolver: Resolver, metrics: Metrics,
                 on_orphan_crash: Callable[[str, BaseException], None]) -> None:
        self.loop = loop
        self.resolver = resolver
        self.metrics = metrics
        self.reach = Reach(Dialer(loop), self.resolve)  # (shared with probe, checks and token keys)
        self.pool = UpstreamPool()
        self._on_orphan_crash = on_orphan_crash

    # --- forwarded requests: idle connections --------------------------------------------
    def idle(self, r: Route, connect: bool) -> Link | None:
        """An idle pooled connection for the route's first member, if one waits (no await)."""
        if connect or not r.plans:
            return None
        plan = r.plans[0]
        up = self.pool.take(self._pool_key(r, plan))
        if up is None:
            return None
        return Link(up, True, plan, plan.upstream)

    def release(self, up: Upstream, key: tuple) -> None:
        self.pool.put(up, key, self.loop.time())

    @staticmethod
    def _pool_key(r: Route, plan: EgressPlan) -> tuple:
        if plan.upstream is not None:
            return (plan.key, str(plan.upstream.address), 0)
        return (plan.key, r.addresses[0], r.dest.port)

    # --- new connections -----------------------------------------------------------------------
    def connect(self, r: Route, connect: bool, chain_timeout: float, fresh: bool = False) -> Awaitable[Link]:
        """A connection for the route, to await: pooled (unless ``fresh`` or a CONNECT) or new.
        (A plain function handing back the coroutine that does it: one level less to resume.)"""
        pooled = not connect and not fresh
        if r.chained:
            return self._via_upstream_proxy(r, connect, pooled, chain_timeout)
        return self._direct(r, connect, pooled)

    async def _direct(self, r: Route, connect: bool, pooled: bool) -> Link:
        last: UpstreamError | None = None
        pool, addresses, port = r.pool, r.addresses, r.dest.port
        for plan in r.plans:
            if pooled:
                up = self.pool.take((plan.key, addresses[0], port))
                if up is not None:
                    return Link(up, True, plan)
            t0 = time.perf_counter()
            try:  # (the dial awaited here, not in a helper coroutine: one level less to resume)
                up = await self.reach.open(plan, r.dest, GUARD, pool.connect_timeout, addresses,
                                           self._new_tunnel_upstream if connect else self._new_upstream, connect)
            except SourceUnavailable as err:
                self._source_unavailable(pool, plan, err)
                last = err
                continue
            self._dialed(pool, plan, t0)
            if connect:  # (a banner the server sent already goes to the client first)
                return Link(up, False, plan, leftover=up.take_early())
            up.key = (plan.key, up.remote, port)
            return Link(up, False, plan)
        raise last or UpstreamError("no usable egress address in profile " + pool.name)

    async def _via_upstream_proxy(self, r: Route, connect: bool, pooled: bool, chain_timeout: float) -> Link:
        last: UpstreamError | None = None
        pool = r.pool
        for plan in r.plans:
            proxy = plan.upstream
            key = self._pool_key(r, plan)
            try:
                if pooled:
                    up = self.pool.take(key)
                    if up is not None:
                        return Link(up, True, plan, proxy)
                t0 = time.perf_counter()
                up = await self.reach.open(plan, r.dest, GUARD, pool.connect_timeout, None,
                                           self._new_tunnel_upstream if connect else self._new_upstream, connect,
                                           chain_timeout)
                self._dialed(pool, plan, t0)
            except SourceUnavailable as err:
                self._source_unavailable(pool, plan, err)
                last = err
                continue
            except TunnelRefused:
                pool.mark_up(plan)  # (it answered)
                raise
            except UpstreamError as err:
                pool.mark_down(plan)
                self.source_state(pool, plan, False)
                last = err
                continue
            pool.mark_up(plan)
            if connect:
                return Link(up, False, plan, proxy, up.take_early())
            up.key = key
            return Link(up, False, plan, proxy)
        raise last or UpstreamError("no upstream proxy of profile " + pool.name + " is reachable")

    async def resolve(self, host: str) -> list[str]:
        t0 = time.perf_counter()  # (uvloop's loop.time() ticks in milliseconds)
        try:
            return await self.resolver.resolve(host)
        finally:
            self.metrics.dns_seconds.observe(time.perf_counter() - t0)

    def _dialed(self, pool: ProfilePool, plan: EgressPlan, t0: float) -> None:
        """A new connection through ``plan`` is up: its connect time counted; a source address
        marked down before is up again."""
        self.metrics.connected(pool.name, time.perf_counter() - t0)
        if plan.source is not None and pool.is_down(plan):
            pool.mark_up(plan)
            self.source_state(pool, plan, True)

    def _source_unavailable(self, pool: ProfilePool, plan: EgressPlan, err: SourceUnavailable) -> None:
        """The host no longer has ``plan``'s source address: marked down (the next member is tried)."""
        pool.mark_down(plan)
        self.source_state(pool, plan, False)
        log_event("egress_source_down", profile=pool.name, source=plan.source, error=err.detail)

    def source_state(self, pool: ProfilePool, plan: EgressPlan, up: bool) -> None:
        self.metrics.egress_source_up.labels(pool.name, plan.label).set(1 if up else 0)

    def _new_upstream(self) -> Upstream:
        return Upstream(self._on_orphan_crash)

    def _new_tunnel_upstream(self) -> Upstream:
        return Upstream(self._on_orphan_crash, hold_early=True)
