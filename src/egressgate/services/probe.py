"""Which IP does each egress profile really exit from?

For every member of a profile (each source address of a ``bind`` pool, each chained proxy
of an ``upstream`` pool, or the direct route), fetch an IP-echo URL (the first of
``probe.echo_url`` that answers) through exactly that member and compare the answer (plain-text
IP, or JSON with an ``ip`` or ``origin`` field) with the profile's ``expect_ip``. Used by ``egressgate probe`` and by the server, which
repeats it every ``probe.interval`` and exposes the result in ``/readyz`` and metrics.

The echo URL is operator-configured, so the address guard does not apply to it (as for
upstream proxies).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..egress.dialer import Dialer
from ..egress.plan import EgressPlan, ProfilePool
from ..egress.resolver import Resolver
from ..errors import GatewayError
from ..http1.parse import ResponseHead, ResponseParser
from ..model import HostPort
from ..observe.accesslog import log_event
from ..proxy import chain
from ..proxy.runtime import Runtime
from ..proxy.server import Gateway
from ..proxy.upstream import Upstream


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


class Fetch:
    """The owner of an ``Upstream`` while an HTTP answer (the echo service's; the issuer's keys
    in ``keysource``) is read, at most ``limit`` bytes of body."""

    def __init__(self, what: str = "echo service", limit: int = 65536) -> None:
        self.what = what
        self.limit = limit
        self.status = 0
        self.body = b""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.parser = ResponseParser(self, "GET")

    def upstream_data(self, data: bytes) -> None:
        try:
            self.parser.feed(data)
        except GatewayError as exc:
            self._fail(exc)

    def upstream_eof(self) -> bool:
        try:
            self.parser.feed_eof()
        except GatewayError as exc:
            self._fail(exc)
        self._fail(GatewayError(f"the {self.what} closed the connection before its answer was complete"))
        return False

    def upstream_lost(self, exc: Exception | None) -> None:
        self._fail(GatewayError(f"the connection to the {self.what} was lost: {exc or 'closed'}"))

    def upstream_pause_writing(self) -> None:
        pass

    def upstream_resume_writing(self) -> None:
        pass

    def crashed(self, where: str, exc: BaseException) -> None:
        self._fail(GatewayError(f"internal error in {where}: {type(exc).__name__}"))

    def _fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def on_response_head(self, head: ResponseHead) -> None:
        self.status = head.status

    def on_response_body(self, data: bytes) -> None:
        self.body += data
        if len(self.body) > self.limit:
            raise GatewayError(f"{self.what} answer too large")

    def on_response_end(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


def parse_echo(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    if text.startswith("{"):
        doc = json.loads(text)
        text = str(doc.get("ip") or doc.get("origin") or "").split(",")[0].strip()
    return str(ipaddress.ip_address(text))


async def observe(plan: EgressPlan, url: str, dialer: Dialer, resolver: Resolver, timeout: float) -> str:
    """The IP the echo service at ``url`` sees when reached through ``plan``: the same source
    address, or the same chained proxy (``chain.open_tunnel``, as the proxy itself uses)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"echo URL must be http:// or https://, got {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    dest = HostPort(parts.hostname, port)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        rest = b""
        if plan.upstream is not None:
            proxy = plan.upstream.address
            addrs = [proxy.host] if proxy.is_ip else await resolver.resolve(proxy.host)
            _, up, _ = await dialer.connect(EgressPlan(plan.profile, "direct"), addrs, proxy.port, Upstream, timeout)
            rest = await chain.open_tunnel(up, dest, plan.upstream.authorization, timeout)
        else:
            addrs = [dest.host] if dest.is_ip else await resolver.resolve(dest.host)
            _, up, _ = await dialer.connect(plan, addrs, port, Upstream, timeout)
        try:
            if parts.scheme == "https":
                if rest:
                    raise GatewayError("the echo service spoke before the TLS handshake")
                up.transport = await loop.start_tls(up.transport, up, ssl.create_default_context(),
                                                    server_hostname=parts.hostname)
            fetch = Fetch()
            up.attach(fetch)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            up.transport.write(f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: text/plain, application/json\r\n"
                               f"User-Agent: egressgate-probe\r\nConnection: close\r\n\r\n".encode())
            if rest:
                fetch.upstream_data(rest)
            await fetch.done
        finally:
            up.detach()
            up.transport.close()
    if fetch.status != 200:
        raise GatewayError(f"echo service answered {fetch.status}")
    return parse_echo(fetch.body)


async def observe_any(plan: EgressPlan, urls: str | tuple[str, ...] | list[str], dialer: Dialer,
                      resolver: Resolver, timeout: float) -> str:
    """``observe`` through the first of ``urls`` that answers (several independent echo
    services: one being down does not leave the member unverified). An answer is final, even a
    wrong IP: the next service is asked only when one gave no usable answer."""
    urls = (urls,) if isinstance(urls, str) else tuple(urls)
    failures = []
    for url in urls:
        try:
            return await observe(plan, url, dialer, resolver, timeout)
        except TimeoutError:
            failures.append(f"{url}: timed out after {timeout:g}s")
        except (GatewayError, OSError, ValueError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            detail = exc.detail if isinstance(exc, GatewayError) else str(exc) or type(exc).__name__
            failures.append(f"{url}: {detail}" if len(urls) > 1 else detail)
    raise GatewayError("; ".join(failures) if len(urls) > 1 else failures[0])


async def probe_pools(pools: dict[str, ProfilePool], url: str | tuple[str, ...] | list[str], timeout: float,
                      dialer: Dialer | None = None, resolver: Resolver | None = None,
                      only: set[EgressPlan] | None = None,
                      each: Callable[[Observation], None] | None = None) -> list[Observation]:
    """Observe every member of ``pools`` (or only the members in ``only``), concurrently;
    ``each`` gets every observation as soon as it is made (a slow member, e.g. a route that
    times out, does not hold back the others' results)."""
    dialer = dialer or Dialer(asyncio.get_running_loop())
    resolver = resolver or Resolver()

    async def one(pool: ProfilePool, plan: EgressPlan) -> Observation:
        obs = await attempt(pool, plan)
        if each is not None:
            each(obs)
        return obs

    async def attempt(pool: ProfilePool, plan: EgressPlan) -> Observation:
        try:
            ip = await observe_any(plan, url, dialer, resolver, timeout)
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
                                             gw.connector.dialer, gw.connector.resolver, only=only, each=each)
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
