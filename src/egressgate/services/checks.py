"""Does provider Y accept egress IP X right now? Provider checks through each member.

``check`` reaches one provider through one member of a profile exactly as a job's request
leaves, over ``egress.fetch`` (and so ``egress.reach``, the one way out): the provider's name
resolved by the gateway's resolver, every address judged by the address guard the caller passes
(the runtime's), the connection from the member's source address or through its chained proxy
(CONNECT as the proxy itself sends it), then TLS with SNI and certificate verification
(``https://``) and a HEAD or GET whose status is judged against ``accept``. It never raises: every failure is a ``ProviderResult`` whose ``outcome``
names it (see ``egress.providers``) and whose ``detail`` keeps the evidence.

``Verifier`` is the server's side: every member x provider at start, after each reload and
every ``interval``; ``gate_switches`` holds back a ``switch: verified`` reload's new members
until they pass every provider AND (with ``expect_ip``) the egress-IP attestation
(``PendingSwitch``), and the loop promotes a pending switch once they do.
``egressgate verify`` uses ``check_pools`` directly.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable

from ..egress.dialer import SourceUnavailable
from ..egress.failover import Failover
from ..egress.failover import decide as decide_failover
from ..egress.fetch import FetchError, Request, fetch
from ..egress.plan import EgressPlan, ProfilePool
from ..egress.providers import (
    MAX_BODY,
    PendingSwitch,
    ProviderBoard,
    ProviderResult,
    ProviderSpec,
    attestation_failures,
    judge_answer,
    new_members,
    refused_members,
)
from ..egress.reach import Reach
from ..errors import AddressProhibited, ConnectRefused, DnsError, GatewayError, UpstreamError, UpstreamTimeout
from ..fleet.checks import SharedChecks
from ..observe.accesslog import log_event
from ..observe.metrics import Metrics
from ..policy.guard import AddressGuard
from ..proxy.runtime import Runtime

CONCURRENCY = 16  # checks in flight at once


async def check(plan: EgressPlan, spec: ProviderSpec, reach: Reach, guard: AddressGuard,
                tls: ssl.SSLContext | None = None) -> ProviderResult:
    """One member x one provider; never raises (bar cancellation)."""
    at, started = time.time(), time.monotonic()
    remote = egress = None
    wait = None
    status = None
    try:
        answer = await fetch(reach, plan, _request(spec, tls), guard, spec.timeout, max_body=MAX_BODY, truncate=True,
                             wants_body=lambda code: spec.body is not None and spec.accepts(code), what="provider")
    except FetchError as exc:
        outcome, detail, remote, egress = exc.kind, exc.detail, exc.remote, exc.egress
    except GatewayError as exc:  # reach's typed errors: the connection was not made
        outcome, detail = _connect_outcome(exc), exc.detail
    except ConnectionResetError:
        outcome, detail = "reset", "connection reset while connecting"
    except (OSError, ValueError, ssl.SSLError) as exc:
        outcome, detail = "error", f"{type(exc).__name__}: {exc}"
    else:
        remote, egress, status = answer.remote, answer.egress, answer.status
        if status is None:
            outcome, detail = "accepted", f"TLS handshake OK ({answer.tls_version})"
        else:
            outcome, detail, wait = judge_answer(status, answer.head, spec.accepts, spec.expects, time.time())
            why = spec.body.judge(answer.body) if outcome == "accepted" and spec.body is not None else None
            if why is not None:  # a block page or CAPTCHA served with an acceptable status
                outcome, detail = "body_refused", f"{detail}: {why}"
    return ProviderResult(plan.profile, plan.label, spec.name, outcome, detail, at, status, egress, remote,
                          round((time.monotonic() - started) * 1000, 1), wait)


def _request(spec: ProviderSpec, tls: ssl.SSLContext | None) -> Request:
    """The provider's request (``spec.accept`` None: the TLS handshake alone)."""
    context = (tls or ssl.create_default_context()) if spec.tls else None
    method = spec.method if spec.accept is not None or not spec.tls else None
    return Request(spec.dest, context, method, spec.path, spec.host_header,
                   (("User-Agent", "egressgate-verify"), ("Accept", "*/*"), *spec.headers))


def _connect_outcome(exc: GatewayError) -> str:
    """The outcome of a connection ``reach`` could not make."""
    if isinstance(exc, AddressProhibited):
        return "address_prohibited"
    if isinstance(exc, SourceUnavailable):
        return "source_unavailable"
    if isinstance(exc, ConnectRefused):
        return "connect_refused"
    if isinstance(exc, UpstreamTimeout):
        return "dns_error" if exc.reason == "dns_timeout" else "connect_timeout"
    if isinstance(exc, DnsError):
        return "dns_error"
    if isinstance(exc, UpstreamError):
        return "upstream_refused" if exc.reason in ("upstream_refused", "upstream_closed") else "connect_failed"
    return "error"


async def check_pools(pools: dict[str, ProfilePool], board: ProviderBoard, reach: Reach, guard: AddressGuard, only: list[tuple[EgressPlan, ProviderSpec]] | None = None,
                      each: Callable[[ProviderResult], None] | None = None) -> list[ProviderResult]:
    """Check ``only`` these pairs, or every member x provider of ``pools``, concurrently (at most
    ``CONCURRENCY`` at once); ``each`` gets every result as soon as it is made."""
    pairs = only if only is not None else [(plan, spec) for pool in pools.values() for plan in pool.everyone
                                           for spec in board.specs.get(pool.name, ())]
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(plan: EgressPlan, spec: ProviderSpec) -> ProviderResult:
        async with limit:
            result = await check(plan, spec, reach, guard)
        if each is not None:
            each(result)
        return result

    tasks = [asyncio.ensure_future(one(plan, spec)) for plan, spec in pairs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:  # (a bug raised by one check must not leave the others running, their results unread)
        for task in tasks:
            task.cancel()


def publish(metrics: Metrics, rt: Runtime) -> None:
    """The provider gauges of ``rt``: reachability and last-check time per member x provider of
    the members in use, and whether a verified switch is pending, per profile."""
    board = rt.providers
    metrics.provider_reachable.clear()
    metrics.provider_checked.clear()
    metrics.provider_switch_pending.clear()
    for name, pool in rt.profiles.items():
        if not board.specs.get(name):
            continue
        metrics.provider_switch_pending.labels(name).set(1 if name in board.pending else 0)
        for plan in pool.everyone:
            for spec in board.specs[name]:
                r = board.result(name, plan.label, spec.name)
                if r is not None:
                    metrics.provider_reachable.labels(name, plan.label, spec.name).set(1 if r.ok else 0)
                    metrics.provider_checked.labels(name, plan.label, spec.name).set(r.at)


def steer(rt: Runtime) -> list[Failover]:
    """Every profile of ``rt`` steers new connections away from members a required provider
    refuses (``ProfilePool.avoid``); a ``switch: auto`` profile whose active members all failed
    moves them to a standby member that passes everything (``ProfilePool.relief``, see
    ``egress.failover``). Returns the failovers made, for the caller to report."""
    made = []
    for pool in rt.profiles.values():
        pool.avoid = refused_members(rt.providers, pool)
        decision = decide_failover(rt.providers, pool)
        pool.stranded = decision.stranded
        if decision.failover is not None:
            pool.relief = next(m for m in pool.standby if m.label == decision.failover.to)
            pool.relief_view = {**decision.failover.event(), "at": time.time()}
            made.append(decision.failover)
    return made


class Verifier:
    """The server's provider checks (every worker checks for itself, as for egress IPs: each
    decides alone about a verified switch). ``current()``: the runtime in force; ``publish``:
    export a runtime's results; ``attest(rt, members, pools=None)``: the egress-IP check of
    ``members`` (of ``pools``, default ``rt.profiles``: a pending switch's candidate is not in it); ``log``: this process logs ``provider_check`` events;
    ``on_error(where, exc)``: a bug, counted and logged (the checker itself keeps running);
    ``held(profile, member, host)``: (seconds left, why) while the gateway's own ``protect`` holds
    that member for that host -- the check does not go out then, and is ``throttled``;
    ``shared``: with a fleet store, the checks other processes of the fleet made (``fleet.checks``);
    ``observed(result)``: every result, as it is made (block-aware egress: ``proxy.blocks``);
    ``on_failover(failover)``: a ``switch: auto`` profile moved its new connections to a standby
    member (``steer``): report it (event, metric)."""

    def __init__(self, current: Callable[[], Runtime], reach: Callable[[], Reach], publish: Callable[[Runtime], None],
                 attest: Callable[..., Awaitable[None]], log: bool,
                 on_error: Callable[[str, BaseException], None],
                 held: Callable[[str, str, str], tuple[float, str] | None] | None = None,
                 shared: SharedChecks | None = None,
                 observed: Callable[[ProviderResult], None] | None = None,
                 on_failover: Callable[[Failover], None] = lambda made: None) -> None:
        self.on_error = on_error
        self.observed = observed
        self.on_failover = on_failover
        self.held = held
        self.shared = shared  # with a fleet store: one process of the fleet checks each pair per interval
        self.current = current
        self.reach = reach
        self.publish = publish
        self.attest = attest
        self.log = log
        self._now = asyncio.Event()
        self._all = False

    def wake(self, everything: bool = False) -> None:
        """Check what is due now; with ``everything`` (after a reload) every pair again."""
        self._all = self._all or everything
        self._now.set()

    async def _check(self, rt: Runtime, pairs: list[tuple[EgressPlan, ProviderSpec]],
                     pools: dict[str, ProfilePool] | None = None) -> list[ProviderResult]:
        """Check ``pairs`` (members of ``pools``, default ``rt.profiles``), except those that must
        not go out now: a member the gateway's own ``protect`` holds for the provider's host, or
        one whose egress-IP check saw a wrong IP (``exits_wrong``) -- each a ``throttled`` result
        (no verdict)."""
        pools = rt.profiles if pools is None else pools
        def each(r: ProviderResult) -> None:
            rt.providers.record(r)
            if self.observed is not None:  # block-aware egress: a check moves the member's block state
                self.observed(r)
            if self.log:
                log_event("provider_check", profile=r.profile, member=r.member, provider=r.provider, ok=r.ok,
                          outcome=r.outcome, detail=r.detail, status=r.status, egress_addr=r.egress_addr,
                          remote_addr=r.remote_addr, duration_ms=r.duration_ms)
        go, held = [], []
        for plan, spec in pairs:
            pool = pools.get(plan.profile)
            wrong = pool.exits_wrong(plan) if pool is not None else None
            hold = self.held(plan.profile, plan.label, spec.dest.host) if self.held is not None else None
            if wrong is not None:
                r = ProviderResult(plan.profile, plan.label, spec.name, "throttled",
                                   f"not checked: {plan.label} leaves from {wrong}, not one of "
                                   f"[{', '.join(pool.expect_ip)}] (the provider must not see that IP)", time.time())
            elif hold is not None:
                left, why = hold
                r = ProviderResult(plan.profile, plan.label, spec.name, "throttled",
                                   f"not checked: the gateway holds {plan.label} for {spec.dest.host} ({why}, "
                                   f"{left:.0f}s left)", time.time(), retry_after=round(left, 3))
            else:
                go.append((plan, spec))
                continue
            each(r)
            held.append(r)
        if self.shared is not None and go:
            go, taken = await self.shared.split(rt.profiles, go)
            for r in taken:
                each(r)
            held += taken
        results = await check_pools(rt.profiles, rt.providers, self.reach(), rt.guard, only=go, each=each)
        if self.shared is not None and go:
            await self.shared.save(rt.profiles, go, results)
        return held + results

    async def check_due(self, rt: Runtime, force: bool = False) -> None:
        board = rt.providers
        now = time.time()
        pairs = []
        for pool in rt.profiles.values():
            pairs += ([(p, s) for p in pool.everyone for s in board.specs.get(pool.name, ())] if force
                      else board.due(pool, now))
        if pairs:
            await self._check(rt, pairs)
        self.steer(rt)
        for pending in list(board.pending.values()):
            every = min((s.interval for s in board.specs.get(pending.profile, ())), default=0.0)
            if force or now - max((f.at for f in pending.failures), default=0.0) >= every:
                await self._retry_switch(rt, pending)
        self.steer(rt)  # (again: a promoted switch's members)
        self.publish(rt)

    def steer(self, rt: Runtime, before: Runtime | None = None) -> None:
        """``steer`` ``rt`` and report each failover it made (``on_failover``), unless ``before``
        (the runtime a reload replaces) had already failed that profile over to the same member."""
        for made in steer(rt):
            was = before.profiles.get(made.profile) if before is not None else None
            if was is not None and was.relief is not None and was.relief.label == made.to:
                rt.profiles[made.profile].relief_view = was.relief_view  # the same failover, carried over
                continue
            self.on_failover(made)

    async def gate_switches(self, old: Runtime, new: Runtime) -> dict[str, PendingSwitch]:
        """Before ``new`` is committed: for each ``switch: verified`` (or ``auto``) profile whose
        members change, check the new members against every provider (a promoted standby's
        fresh passing results stand). A profile whose new members do
        not all pass keeps its old pool in ``new`` (so new connections stay on the old members)
        and gets a ``PendingSwitch``; returned, by profile."""
        board = new.providers
        self.steer(new, old)
        held: dict[str, PendingSwitch] = {}
        for name, pool in list(new.profiles.items()):
            previous = old.profiles.get(name)
            if board.switch.get(name) not in ("verified", "auto") or previous is None:
                continue
            added = new_members(previous, pool)
            if not added:
                continue
            # a member promoted from standby was checked as one: what it passed within its
            # provider's interval stands (it switches at once); anything else is checked now
            now = time.time()
            known = [r for m in added for s in board.specs.get(name, ())
                     if (r := board.result(name, m.label, s.name)) is not None and r.ok and now - r.at < s.interval]
            fresh = {(r.member, r.provider) for r in known}
            results = known + await self._check(new, [(m, s) for m in added for s in board.specs.get(name, ())
                                                      if (m.label, s.name) not in fresh])
            # (attested before this gate, while the new pool was in ``new``)
            failures = attestation_failures(pool, added, time.time()) + [r for r in results if not r.ok]
            if failures:
                new.profiles[name] = previous  # the old members stay in force, with their results
                board.adopt(old.providers, {name: previous})
                held[name] = board.pending[name] = PendingSwitch(name, pool, failures, time.time())
                log_event("provider_switch", profile=name, state="pending", old_members=[m.label for m in previous.members],
                          new_members=[m.label for m in pool.members], reason=held[name].describe())
            else:
                log_event("provider_switch", profile=name, state="done", old_members=[m.label for m in previous.members],
                          new_members=[m.label for m in pool.members],
                          reason="every new member passed every provider" + (" and the egress-IP check"
                                                                             if pool.attest else ""))
        for name, was in old.providers.pending.items():  # a reload ends every switch pending before it
            members = [m.label for m in was.candidate.members]
            now = held.get(name)
            if now is not None and [m.label for m in now.candidate.members] == members:
                continue  # the same switch, still pending
            current = new.profiles.get(name)
            reason = ("the profile is gone from the config" if current is None else
                      f"replaced by a pending switch to {', '.join(m.label for m in now.candidate.members)}"
                      if now is not None else
                      "reverted: the reloaded config keeps the current members"
                      if current is old.profiles.get(name) or not new_members(old.profiles.get(name), current)
                      else "the reloaded config's members took over")
            log_event("provider_switch", profile=name, state="cancelled",
                      old_members=[m.label for m in old.profiles[name].members], new_members=members, reason=reason)
        return held

    async def _retry_switch(self, rt: Runtime, pending: PendingSwitch) -> None:
        candidate = pending.candidate
        added = new_members(rt.profiles.get(pending.profile), candidate)
        if candidate.attest:  # the candidate is not in the runtime: the prober does not check it by itself
            await self.attest(rt, set(added), {pending.profile: candidate})
        results = await self._check(rt, [(m, s) for m in added for s in rt.providers.specs.get(pending.profile, ())],
                                    {**rt.profiles, pending.profile: candidate})
        failures = attestation_failures(candidate, added, time.time()) + [r for r in results if not r.ok]
        if failures:
            pending.failures = failures
            return
        old = rt.profiles[pending.profile]
        rt.profiles[pending.profile] = pending.candidate
        del rt.providers.pending[pending.profile]
        # (its members were attested at the reload, while they were in the runtime; any that
        # were not are checked now, as a reload would)
        await self.attest(rt, set(pending.candidate.unchecked()) if pending.candidate.attest else set())
        log_event("provider_switch", profile=pending.profile, state="done",
                  old_members=[m.label for m in old.members], new_members=[m.label for m in pending.candidate.members],
                  reason="every new member now passes every provider" + (" and the egress-IP check"
                                                                         if candidate.attest else ""))

    async def run(self) -> None:
        while True:
            rt = self.current()
            self._now.clear()
            force, self._all = self._all, False
            try:
                await self.check_due(rt, force)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the checker must never stop
                self.on_error("providers", exc)
            wait = rt.providers.next_due(rt.profiles, time.time())
            try:
                await asyncio.wait_for(self._now.wait(), 3600.0 if wait is None else max(wait, 0.05))
            except TimeoutError:
                pass
