"""Does provider Y accept egress IP X right now? Provider checks through each member.

``check`` reaches one provider through one member of a profile exactly as a job's request
leaves: the provider's name resolved by the gateway's resolver, every address judged by the
address guard, the connection made by ``egress.dialer`` from the member's source address (or
through its chained proxy with ``proxy.chain``, CONNECT as the proxy itself sends it), then TLS
with SNI and certificate verification (``https://``) and a HEAD or GET whose status is judged
against ``accept``. It never raises: every failure is a ``ProviderResult`` whose ``outcome``
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

from ..egress.dialer import Dialer, SourceUnavailable
from ..egress.failover import Failover
from ..egress.failover import decide as decide_failover
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
from ..egress.providers import header as providers_header
from ..egress.resolver import Resolver
from ..errors import ConnectRefused, DnsError, GatewayError, UpstreamError, UpstreamTimeout
from ..fleet.checks import SharedChecks
from ..observe.accesslog import log_event
from ..observe.metrics import Metrics
from ..policy.guard import AddressGuard
from ..proxy import chain
from ..proxy.runtime import Runtime
from ..proxy.upstream import Upstream

MAX_HEAD = 64 * 1024
CONCURRENCY = 16  # checks in flight at once


class _Failed(Exception):
    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail


class _HeadReader(chain.HeadReader):
    """The provider's response head, each way of failing an outcome of its own."""

    __slots__ = ()

    def oversized(self) -> BaseException:
        return _Failed("bad_response", "response head over 64 KiB")

    def closed(self, exc: Exception | None) -> BaseException:
        if exc is None:
            return _Failed("closed", "the provider closed the connection before answering")
        if isinstance(exc, ConnectionResetError):
            return _Failed("reset", "connection reset by the provider before it answered")
        return _Failed("closed", f"the connection was lost before an answer: {exc}")

    def bug(self, where: str, exc: BaseException) -> BaseException:
        return _Failed("error", f"internal error in {where}: {type(exc).__name__}")


class _BodyReader:
    """The start of a provider's body (for ``BodyRules``): up to ``want`` bytes, or what came
    before the provider closed."""

    __slots__ = ("done", "buf", "want")

    def __init__(self, first: bytes, want: int) -> None:
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.buf = first
        self.want = want
        if len(first) >= want:
            self.done.set_result(first[:want])

    def upstream_data(self, data: bytes) -> None:
        if self.done.done():
            return
        self.buf += data
        if len(self.buf) >= self.want:
            self.done.set_result(self.buf[:self.want])

    def upstream_eof(self) -> bool:
        if not self.done.done():
            self.done.set_result(self.buf)
        return False

    def upstream_lost(self, exc: Exception | None) -> None:  # noqa: ARG002
        self.upstream_eof()

    def upstream_pause_writing(self) -> None:
        pass

    def upstream_resume_writing(self) -> None:
        pass

    def crashed(self, where: str, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(_Failed("error", f"internal error in {where}: {type(exc).__name__}"))


def _status(head: bytes) -> tuple[int, bytes]:
    line = head.split(b"\r\n", 1)[0][:200].decode("latin-1")
    status = chain.reply_status(head)
    if not status:
        raise _Failed("bad_response", f"not an HTTP response: {line!r}")
    return status, head


def _tls_detail(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    return exc.reason or str(exc)


async def check(plan: EgressPlan, spec: ProviderSpec, dialer: Dialer, resolver: Resolver,
                guard: AddressGuard, tls: ssl.SSLContext | None = None) -> ProviderResult:
    """One member x one provider; never raises (bar cancellation)."""
    at, started = time.time(), time.monotonic()
    where: dict[str, str | None] = {"egress": None, "remote": None}
    wait = None
    try:
        async with asyncio.timeout(spec.timeout):
            status, line, body = await _exchange(plan, spec, dialer, resolver, guard, tls, where)
    except _Failed as f:
        outcome, detail, status = f.outcome, f.detail, None
    except TimeoutError:
        phase = "no_response" if where["remote"] else "connect_timeout"
        outcome, detail, status = phase, (f"no answer within {spec.timeout:g}s" if where["remote"] else
                                          f"no connection within {spec.timeout:g}s"), None
    except GatewayError as exc:  # anything else the dial path raises, named as it is
        outcome, detail, status = "error", exc.detail, None
    except (OSError, ValueError, ssl.SSLError) as exc:
        outcome, detail, status = "error", f"{type(exc).__name__}: {exc}", None
    else:
        if status is None:
            outcome, detail = "accepted", line
        else:
            outcome, detail, wait = judge_answer(status, line, spec.accepts, spec.expects, time.time())
            why = spec.body.judge(body) if outcome == "accepted" and spec.body is not None else None
            if why is not None:  # a block page or CAPTCHA served with an acceptable status
                outcome, detail = "body_refused", f"{detail}: {why}"
    return ProviderResult(plan.profile, plan.label, spec.name, outcome, detail, at, status, where["egress"],
                          where["remote"], round((time.monotonic() - started) * 1000, 1), wait)


async def _exchange(plan: EgressPlan, spec: ProviderSpec, dialer: Dialer, resolver: Resolver,
                    guard: AddressGuard, tls: ssl.SSLContext | None, where: dict) -> tuple[int | None, str | bytes, bytes]:
    dest = spec.dest
    loop = asyncio.get_running_loop()
    rest = b""
    try:
        if plan.upstream is not None:  # as the proxy does: names are resolved by the chained proxy
            if dest.is_ip and guard.check(dest.host):
                raise _Failed("address_prohibited", f"{dest.host} is refused by the address guard "
                                                    f"({guard.check(dest.host)})")
            proxy = plan.upstream.address
            addrs = [proxy.host] if proxy.is_ip else await resolver.resolve(proxy.host)
            _, up, remote = await dialer.connect(EgressPlan(plan.profile, "direct"), addrs, proxy.port, Upstream,
                                                 spec.timeout)
            where["remote"] = f"{dest} via {plan.upstream}"
            where["egress"] = str(plan.upstream)
            rest = await chain.open_tunnel(up, dest, plan.upstream.authorization, spec.timeout)
        else:
            addrs = [dest.host] if dest.is_ip else await resolver.resolve(dest.host)
            usable = [a for a in addrs if guard.check(a) is None]
            if not usable:
                raise _Failed("address_prohibited", f"{dest.host} resolves only to addresses the guard refuses: "
                                                    + ", ".join(f"{a} ({guard.check(a)})" for a in addrs[:3]))
            _, up, remote = await dialer.connect(plan, usable, dest.port, Upstream, spec.timeout)
            where["remote"] = f"{remote}:{dest.port}" if ":" not in remote else f"[{remote}]:{dest.port}"
            where["egress"] = up.local
    except SourceUnavailable as exc:
        raise _Failed("source_unavailable", exc.detail) from None
    except ConnectRefused as exc:
        raise _Failed("connect_refused", exc.detail) from None
    except UpstreamTimeout as exc:
        raise _Failed("dns_error" if exc.reason == "dns_timeout" else "connect_timeout", exc.detail) from None
    except DnsError as exc:
        raise _Failed("dns_error", exc.detail) from None
    except UpstreamError as exc:
        outcome = "upstream_refused" if exc.reason in ("upstream_refused", "upstream_closed") else "connect_failed"
        raise _Failed(outcome, exc.detail) from None
    except ConnectionResetError:
        raise _Failed("reset", "connection reset while connecting") from None
    try:
        if spec.tls:
            if rest:
                raise _Failed("bad_response", "the provider spoke before the TLS handshake")
            try:
                up.transport = await loop.start_tls(up.transport, up, tls or ssl.create_default_context(),
                                                    server_hostname=dest.host)
            except ssl.SSLError as exc:
                raise _Failed("tls_error", _tls_detail(exc)) from None
            except ConnectionResetError:
                raise _Failed("reset", "connection reset during the TLS handshake") from None
            except (ConnectionError, OSError) as exc:
                raise _Failed("closed", f"the connection ended during the TLS handshake: {exc}") from None
            if spec.accept is None:
                ssl_object = up.transport.get_extra_info("ssl_object")
                return None, f"TLS handshake OK ({ssl_object.version() if ssl_object else 'TLS'})", b""
        reader = _HeadReader(MAX_HEAD)
        up.attach(reader)
        extra = "".join(f"{name}: {value}\r\n" for name, value in spec.headers)
        up.transport.write(f"{spec.method} {spec.path} HTTP/1.1\r\nHost: {spec.host_header}\r\nUser-Agent: egressgate-verify\r\n"
                           f"Accept: */*\r\n{extra}Connection: close\r\n\r\n".encode("latin-1"))
        if rest:
            reader.upstream_data(rest)
        head, after = await reader.done
        status, head = _status(head)
        if spec.body is None or not spec.accepts(status):
            return status, head, b""
        length = providers_header(head, b"content-length")
        want = min(int(length), MAX_BODY) if length is not None and length.isdigit() else MAX_BODY
        body = _BodyReader(after, want)
        up.attach(body)
        return status, head, await body.done
    finally:
        up.detach()
        up.transport.abort() if spec.tls else up.transport.close()


async def check_pools(pools: dict[str, ProfilePool], board: ProviderBoard, dialer: Dialer, resolver: Resolver,
                      guard: AddressGuard, only: list[tuple[EgressPlan, ProviderSpec]] | None = None,
                      each: Callable[[ProviderResult], None] | None = None) -> list[ProviderResult]:
    """Check ``only`` these pairs, or every member x provider of ``pools``, concurrently (at most
    ``CONCURRENCY`` at once); ``each`` gets every result as soon as it is made."""
    pairs = only if only is not None else [(plan, spec) for pool in pools.values() for plan in pool.everyone
                                           for spec in board.specs.get(pool.name, ())]
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(plan: EgressPlan, spec: ProviderSpec) -> ProviderResult:
        async with limit:
            result = await check(plan, spec, dialer, resolver, guard)
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

    def __init__(self, current: Callable[[], Runtime], dialer: Callable[[], Dialer],
                 resolver: Callable[[], Resolver], publish: Callable[[Runtime], None],
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
        self.dialer = dialer
        self.resolver = resolver
        self.publish = publish
        self.attest = attest
        self.log = log
        self._now = asyncio.Event()
        self._all = False

    def wake(self, everything: bool = False) -> None:
        """Check what is due now; with ``everything`` (after a reload) every pair again."""
        self._all = self._all or everything
        self._now.set()

    async def _check(self, rt: Runtime, pairs: list[tuple[EgressPlan, ProviderSpec]]) -> list[ProviderResult]:
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
            hold = self.held(plan.profile, plan.label, spec.dest.host) if self.held is not None else None
            if hold is None:
                go.append((plan, spec))
                continue
            left, why = hold
            r = ProviderResult(plan.profile, plan.label, spec.name, "throttled",
                               f"not checked: the gateway holds {plan.label} for {spec.dest.host} ({why}, "
                               f"{left:.0f}s left)", time.time(), retry_after=round(left, 3))
            each(r)
            held.append(r)
        if self.shared is not None and go:
            go, taken = await self.shared.split(rt.profiles, go)
            for r in taken:
                each(r)
            held += taken
        results = await check_pools(rt.profiles, rt.providers, self.dialer(), self.resolver(), rt.guard,
                                    only=go, each=each)
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
        results = await self._check(rt, [(m, s) for m in added for s in rt.providers.specs.get(pending.profile, ())])
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
