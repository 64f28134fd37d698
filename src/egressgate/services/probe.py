"""Which IP does each egress profile really exit from?

For every member of a profile (each source address of a ``bind`` pool, each chained proxy
of an ``upstream`` pool, or the direct route), fetch an IP-echo URL (the first of
``probe.echo_url`` that answers) through exactly that member and compare the answer (plain-text
IP, or JSON with an ``ip`` or ``origin`` field) with the profile's ``expect_ip``. Used by ``egressgate probe`` and by the server, which
repeats it every ``probe.interval`` and exposes the result in ``/readyz`` and metrics.

The echo URL is operator-configured, so the address guard does not apply to it (as for
upstream proxies): ``GUARD``, the guard this module passes to ``egress.fetch``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..egress.dialer import Dialer
from ..egress.fetch import fetch, get
from ..egress.plan import EgressPlan, ProfilePool
from ..egress.reach import Reach, Unguarded
from ..egress.resolver import Resolver
from ..errors import GatewayError
from ..observe.accesslog import log_event
from ..proxy.runtime import Runtime
from ..proxy.server import Gateway

GUARD = Unguarded("the echo URL is operator-configured (probe.echo_url)")
ACCEPT = (("Accept", "text/plain, application/json"), ("User-Agent", "egressgate-probe"))


@dataclass(frozen=True, slots=True)
class Observation:
    profile: str
    member: str
    observed: str | None
    expected: tuple[str, ...]
    error: str | None = None

    @property
    def verdict(self) -> str:
        if self.error:
            return "ERROR"
        if not self.expected:
            return "OK (nothing expected)"
        return "OK" if self.observed in self.expected else "MISMATCH"

    @property
    def ok(self) -> bool:
        return self.verdict.startswith("OK")


def member_label(plan: EgressPlan) -> str:
    return plan.label


def parse_echo(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    if text.startswith("{"):
        doc = json.loads(text)
        text = str(doc.get("ip") or doc.get("origin") or "").split(",")[0].strip()
    return str(ipaddress.ip_address(text))


async def observe(plan: EgressPlan, url: str, reach: Reach, timeout: float) -> str:
    """The IP the echo service at ``url`` sees when reached through ``plan``: the same source
    address, or the same chained proxy, as the proxy itself uses (``egress.fetch``)."""
    answer = await fetch(reach, plan, get(url, ACCEPT), GUARD, timeout, what="echo service")
    if answer.status != 200:
        raise GatewayError(f"echo service answered {answer.status}")
    return parse_echo(answer.body)


async def observe_any(plan: EgressPlan, urls: str | tuple[str, ...] | list[str], reach: Reach,
                      timeout: float) -> str:
    """``observe`` through the first of ``urls`` that answers (several independent echo
    services: one being down does not leave the member unverified). An answer is final, even a
    wrong IP: the next service is asked only when one gave no usable answer."""
    urls = (urls,) if isinstance(urls, str) else tuple(urls)
    failures = []
    for url in urls:
        try:
            return await observe(plan, url, reach, timeout)
        except TimeoutError:
            failures.append(f"{url}: timed out after {timeout:g}s")
        except (GatewayError, OSError, ValueError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            detail = exc.detail if isinstance(exc, GatewayError) else str(exc) or type(exc).__name__
            failures.append(f"{url}: {detail}" if len(urls) > 1 else detail)
    raise GatewayError("; ".join(failures) if len(urls) > 1 else failures[0])


async def probe_pools(pools: dict[str, ProfilePool], url: str | tuple[str, ...] | list[str], timeout: float,
                      reach: Reach | None = None, only: set[EgressPlan] | None = None,
                      each: Callable[[Observation], None] | None = None) -> list[Observation]:
    """Observe every member of ``pools`` (or only the members in ``only``), concurrently;
    ``each`` gets every observation as soon as it is made (a slow member, e.g. a route that
    times out, does not hold back the others' results)."""
    if reach is None:
        reach = Reach(Dialer(asyncio.get_running_loop()), Resolver().resolve)

    async def one(pool: ProfilePool, plan: EgressPlan) -> Observation:
        obs = await attempt(pool, plan)
        if each is not None:
            each(obs)
        return obs

    async def attempt(pool: ProfilePool, plan: EgressPlan) -> Observation:
        try:
            ip = await observe_any(plan, url, reach, timeout)
            return Observation(pool.name, member_label(plan), ip, pool.expect_ip)
        except TimeoutError:
            return Observation(pool.name, member_label(plan), None, pool.expect_ip, f"timed out after {timeout:g}s")
        except (GatewayError, OSError, ValueError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            detail = exc.detail if isinstance(exc, GatewayError) else str(exc) or type(exc).__name__
            return Observation(pool.name, member_label(plan), None, pool.expect_ip, detail)

    jobs = [one(pool, plan) for pool in pools.values() for plan in pool.everyone if only is None or plan in only]
    return list(await asyncio.gather(*jobs))


def record(pools: dict[str, ProfilePool], observations: list[Observation], now: float) -> None:
    """Store each member's observation on its pool (which then uses only verified members)."""
    for obs in observations:
        pool = pools.get(obs.profile)
        if pool is None:
            continue
        for plan in pool.everyone:
            if plan.label == obs.member:
                pool.record(plan, obs.observed, obs.error, now)


def format_table(observations: list[Observation]) -> str:
    rows = [("PROFILE", "MEMBER", "OBSERVED", "EXPECTED", "RESULT")]
    for o in observations:
        result = o.verdict + (f": {o.error}" if o.error else "")
        rows.append((o.profile, o.member, o.observed or "-", ", ".join(o.expected) or "-", result))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows)


class Attestor:
    """The server's egress-IP checks: every profile now, then every ``probe.interval`` (every
    ``probe.retry`` while a profile refuses its traffic) and after reloads (``wake``). Every
    worker checks for itself: each one decides alone whether a profile may carry traffic."""

    def __init__(self, gateway: Gateway, worker: int) -> None:
        self.gateway = gateway
        self.worker = worker
        self._now = asyncio.Event()
        # after each round of checks of the runtime in force (switch: auto decides on failovers)
        self.after: Callable[[Runtime], None] | None = None

    def wake(self) -> None:
        self._now.set()

    async def run(self) -> None:
        while True:
            rt = self.gateway.runtime
            cfg = rt.config.probe
            self._now.clear()  # (before: a reload during this check asks for another)
            await self.attest(rt)
            wait = cfg.interval
            # held members (an echo outage within probe.grace) are re-checked every probe.retry too
            if any(pool.attest and not all(pool.settled(m) for m in pool.members) for pool in rt.profiles.values()):
                wait = min(cfg.interval, cfg.retry)
            try:
                await asyncio.wait_for(self._now.wait(), wait)
            except TimeoutError:
                pass

    async def attest(self, rt: Runtime, only: set | None = None, pools: dict[str, ProfilePool] | None = None) -> None:
        """Probe ``rt``'s profiles (or ``pools``: a pending switch's candidate, not in ``rt``),
        or only the members in ``only``, and record the results."""
        cfg = rt.config.probe
        if not cfg.echo_urls or only == set():
            return
        gw = self.gateway
        own = pools is None
        pools = rt.profiles if pools is None else pools

        def each(o: Observation) -> None:  # recorded as it comes: a slow member does not hold back the others
            record(pools, [o], time.time())
            if own and rt is gw.runtime:
                gw.publish_egress(rt)

        try:
            observations = await probe_pools(pools, cfg.echo_urls, rt.timeouts.upstream_connect,
                                             gw.connector.reach, only=only, each=each)
        except asyncio.CancelledError as exc:
            if asyncio.current_task().cancelling():
                raise  # the prober itself is being stopped
            # a check's own cancellation escaped it (a timeout handled twice): a bug, and one
            # that must not end the prober, or profiles would stay unverified for good
            gw.internal_error("probe", RuntimeError(f"an egress check was cancelled: {exc!r}"))
            return
        except Exception as exc:  # the prober must never stop
            gw.internal_error("probe", exc)
            return
        if own and rt is gw.runtime and self.after is not None:
            self.after(rt)
        if self.worker == 0:
            for o in observations:  # (profiles without expect_ip are shown, not judged: no event)
                if not o.ok and o.expected:
                    log_event("egress_ip_check_failed", profile=o.profile, member=o.member,
                              observed=o.observed, expected=list(o.expected), error=o.error)
