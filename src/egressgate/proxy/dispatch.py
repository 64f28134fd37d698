"""Serving one request up to the moment bytes can move: identify -> route -> connect.

``Dispatcher.now`` takes every step that needs no waiting and returns how far it got:

- a ``Link``: an idle pooled upstream connection, so the request can start at once;
- a ``Whoami``: the gateway answers the request itself (``egressgate.whoami``);
- a ``Pending``: what is left to await (a password check, a DNS lookup, a dial), which
  ``Dispatcher.rest`` then does, returning a ``Link`` or a ``Whoami``.

Refusals are raised as typed ``GatewayError``s (their status is the answer). Nothing here
calls back into the connection: each step fills in the request's record (client, profile,
a report-mode denial) and returns a value.

``Who`` is what a connection knows about its client between requests: the identity found for
its last credentials under a given runtime (a token's only until the token expires), and the
client its connection counts against.
"""

from __future__ import annotations

import time

from ..errors import ClientProtocolError, GatewayError
from ..model import AccessRecord
from ..observe.outcomes import Outcomes
from ..policy.clients import Identity, PendingCheck, PendingKeys, PendingTokenCheck
from . import whoami
from .blocks import BlockDesk
from .connector import Connector, Link
from .forward import Exchange
from .limits import AuthChecks, ClientLimits, PendingAuth
from .listeners import Listeners
from .protect import LeaseNeeded, OverBudget, SharedIpGuard, admit_route
from .route import WHOAMI_HOST, Route, cached_addresses, clip, requested_profile, resolve_and_judge, route
from .runtime import Runtime

LEASE_TRIES = 3  # leases a request waits for before it is refused as over the limit


class Who:
    __slots__ = ("peer", "cert_subject", "identity", "key", "counted")

    def __init__(self, peer: str, cert_subject: str | None = None) -> None:
        self.peer = peer
        self.cert_subject = cert_subject  # a verified TLS client certificate's common name
        self.identity: Identity | None = None
        # (runtime, Proxy-Authorization) the identity was found under. The runtime object itself,
        # not id(): a freed runtime's address is reused, and an identity from an old, wider
        # config must never match a new one.
        self.key: tuple | None = None
        self.counted: str | None = None  # the client this connection counts against (limits)

    def forget(self) -> None:
        """A tunnel took the connection over: no request follows, nothing to remember."""
        self.identity = None
        self.key = None


class Whoami:
    """The gateway's own answer: the ``doc`` of ``egressgate.whoami``, or (``receipt``) the job's
    receipt, to be awaited from the receipts service."""

    __slots__ = ("doc", "receipt")

    def __init__(self, doc: dict, receipt: whoami.ReceiptQuery | None = None) -> None:
        self.doc = doc
        self.receipt = receipt


class Pending:
    """What ``now`` could not finish: the identity (or the password check it needs), the
    route if it got that far, and the shared-IP budget slice its admission waits for."""

    __slots__ = ("identity", "route", "lease")

    def __init__(self, identity: Identity | PendingAuth, r: Route | None,
                 lease: LeaseNeeded | OverBudget | None = None) -> None:
        self.identity = identity
        self.route = r
        self.lease = lease


class Dispatcher:
    def __init__(self, connector: Connector, limits: ClientLimits, auth: AuthChecks, outcomes: Outcomes,
                 listeners: Listeners, protect: SharedIpGuard | None = None) -> None:
        self.connector = connector
        self.protect = protect if protect is not None else SharedIpGuard(connector.loop.time)
        self.limits = limits
        self.auth = auth
        self.outcomes = outcomes
        self.listeners = listeners
        self.receipts: whoami.Receipts | None = None  # job receipts (set by the app when they are on)
        self.blocks: BlockDesk | None = None  # block-aware egress (set by the gateway)

    def now(self, who: Who, ex: Exchange, rt: Runtime, default_profile: str) -> Link | Whoami | Pending:
        identity = self._identify(who, rt, ex.head.proxy_authorization, ex.record)
        if not isinstance(identity, Identity):
            return Pending(identity, None)
        r = self._route(who, ex, rt, identity, default_profile)
        if isinstance(r, Whoami):
            return r
        try:
            ready = cached_addresses(r, self.connector.resolver.cached, rt, self.listeners.own)
        except GatewayError:
            ex.record.addresses = r.resolved  # (the addresses refused, for the record)
            raise
        if ready:
            lease = self._judged(ex.record, r, rt)
            if lease is not None:
                return Pending(identity, r, lease)
            link = self.connector.idle(r, ex.connect)
            if link is not None:
                return self._counted(ex, link)
        return Pending(identity, r)

    async def rest(self, who: Who, ex: Exchange, rt: Runtime, default_profile: str, pending: Pending) -> Link | Whoami:
        r, lease = pending.route, pending.lease
        if r is None:
            identity = pending.identity
            if not isinstance(identity, Identity):
                identity = await self._settle(who, rt, ex.head.proxy_authorization, identity, ex.record)
            r = self._route(who, ex, rt, identity, default_profile)
            if isinstance(r, Whoami):
                return r
            if r.ready:  # (an IP literal, or through a chained proxy: judged by the route step)
                lease = self._judged(ex.record, r, rt)
        if not r.ready:
            try:
                await resolve_and_judge(r, self.connector.resolve, rt, self.listeners.own)
            except GatewayError:
                ex.record.addresses = r.resolved
                raise
            lease = self._judged(ex.record, r, rt)
        if lease is not None:
            ex.waiting = True
            try:
                await self._admission(ex.record, r, rt, lease)
            finally:
                ex.waiting = False
        return self._counted(ex, await self.connector.connect(r, ex.connect, rt.timeouts.upstream_connect))

    async def again(self, ex: Exchange) -> Link:
        """A new connection for an exchange whose reused one failed before answering."""
        return self._counted(ex, await self.connector.connect(ex.route, False, ex.runtime.timeouts.upstream_connect,
                                                              fresh=True))

    @staticmethod
    def _counted(ex: Exchange, link: Link) -> Link:
        """A shared-IP admission follows the member the connector really used (failover) and
        learns the origin's address (a hold its answer starts covers that address too)."""
        rec = ex.record
        if rec.protect is not None:
            rec.protect.moved(link.plan.label, None if link.chained is not None else link.upstream.remote)
        if rec.watch is not None:
            rec.watch.chosen(link.plan)
        return link

    # --- identify ---------------------------------------------------------------------------
    def _identify(self, who: Who, rt: Runtime, auth: bytes | None,
                  rec: AccessRecord) -> Identity | PendingAuth:
        """The client known from an earlier request on the connection, or found now; a password
        not seen before needs a check off the loop (``PendingCheck``), a token the issuer's keys
        (``PendingKeys``) or its signature check (``PendingTokenCheck``). Raises 407 / 403."""
        key = who.key
        known = who.identity
        if known is not None and key[0] is rt and key[1] == auth and (
                known.subject is None or not known.expired(time.time())):
            return known
        result = rt.clients.identify(who.peer, auth, who.cert_subject)
        if isinstance(result, PendingCheck | PendingKeys | PendingTokenCheck):
            return result
        return self._identified(who, rt, auth, result, rec)

    async def _settle(self, who: Who, rt: Runtime, auth: bytes | None, pending: PendingAuth,
                      rec: AccessRecord) -> Identity:
        result = await self.auth.settle(lambda: rt.clients.identify(who.peer, auth, who.cert_subject), who.peer,
                                        pending)
        return self._identified(who, rt, auth, result, rec)

    def _identified(self, who: Who, rt: Runtime, auth: bytes | None, identity: Identity,
                    rec: AccessRecord) -> Identity:
        name = identity.client.name
        if who.counted != name:
            rec.client = identity.name  # (a 429 below names who was refused)
            self.limits.admit(identity.client)  # raises LimitReached (429)
            if who.counted is not None:
                self.limits.release(who.counted)
            who.counted = name
        who.identity = identity
        who.key = (rt, auth)
        return identity

    # --- route ------------------------------------------------------------------------------
    def _route(self, who: Who, ex: Exchange, rt: Runtime, identity: Identity, default_profile: str) -> Route | Whoami:
        rec = ex.record
        rec.client = identity.name
        rec.auth = identity.client.auth
        if identity.requested_profile is not None or ex.head.profile:
            asked = requested_profile(identity, ex.head)
            rec.requested_profile = clip(asked) if asked is not None else None
        if identity.subject is not None and identity.subject.pod:
            rec.extra = {"pod": identity.subject.pod}
        try:
            r = route(ex.head, ex.connect, identity, rt, default_profile, self.listeners.own,
                      getattr(ex, "socks", False))
        except GatewayError as err:
            if err.profile is not None:
                rec.profile = err.profile
            raise
        if r.whoami:
            if r.target is not None and r.target.origin_form.startswith(whoami.RECEIPT_PATH):
                return self._receipt(identity, r)
            return Whoami(whoami.document(identity, who.peer, rt, default_profile, self.protect,
                                          requested_profile(identity, ex.head), self.blocks))
        rec.profile = r.pool.name
        blocks = rt.blocks
        if blocks is not None and self.blocks is not None:  # block-aware egress: a provider's destination?
            w = blocks.lookup(r.pool.name, r.dest)
            if w is not None:
                self.blocks.begin(r, w, rec)  # (raises EgressBlocked: rerouting has nowhere to go)
        ex.route = r
        ex.target = r.target
        if r.would_deny:
            self.outcomes.would_deny(rec, identity.client.name, r.would_deny)
        return r

    def _receipt(self, identity: Identity, r: Route) -> Whoami:
        """``egressgate.whoami/receipt``: this client's own receipt (404 when receipts are off)."""
        try:
            query = whoami.receipt_query(identity, r.target.origin_form)
        except ValueError:
            raise ClientProtocolError("since: expected Unix seconds or ISO 8601 UTC (2026-12-01T09:00:00Z)",
                                      reason="bad_target") from None
        if query is None:
            raise GatewayError(f"no such page: http://{WHOAMI_HOST}{r.target.origin_form.decode('latin-1')}",
                               status=404, reason="whoami_not_found", proxy_status="destination_not_found")
        if self.receipts is None:
            raise GatewayError("receipts are off on this gateway (receipts.enabled: false)", status=404,
                               reason="receipts_off", proxy_status="destination_not_found")
        return Whoami({}, query)

    def _judged(self, rec: AccessRecord, r: Route, rt: Runtime) -> LeaseNeeded | OverBudget | None:
        """The route's addresses are judged (or a chained proxy will resolve it): report-mode
        denials on them, then shared-IP admission -- on the name and every address it may be
        dialed to, so a hold cannot be bypassed by another spelling of the same origin.
        Returns the budget slice admission must lease first (``workers: N``, a fleet store),
        or the refusal of a rule with a hold queue (``protect[].queue``: wait for a turn)."""
        rec.addresses = r.resolved
        if r.would_deny and "would_deny" not in (rec.extra or ()):  # (a rule on the resolved addresses)
            self.outcomes.would_deny(rec, r.client.name, r.would_deny)
        if rt.protect:  # shared-IP protection (proxy.protect); raises LimitReached (429)
            try:
                admit_route(self.protect, rt.protect, r, rec)
            except LeaseNeeded as lease:
                return lease
            except OverBudget as over:
                if over.rule.max_wait is None:
                    raise
                return over
        return None

    async def _admission(self, rec: AccessRecord, r: Route, rt: Runtime, need: LeaseNeeded | OverBudget) -> None:
        """Admission that could not finish at once: lease a budget slice, or wait in the rule's
        hold queue for a turn (raises ``OverBudget``: 429 with Retry-After)."""
        if isinstance(need, LeaseNeeded):
            try:
                await self._leased(rec, r, rt, need)
                return
            except OverBudget as over:
                if over.rule.max_wait is None:
                    raise
                need = over
        await self._queued(rec, r, rt, need)

    async def _leased(self, rec: AccessRecord, r: Route, rt: Runtime, lease: LeaseNeeded, turn: bool = False) -> None:
        """Lease the slice admission lacks, then admit (raises ``OverBudget`` when none is
        left, or when other requests of this worker took each slice first ``LEASE_TRIES`` times)."""
        for _ in range(LEASE_TRIES):
            await self.protect.acquire(lease)
            try:
                admit_route(self.protect, rt.protect, r, rec, turn)
                return
            except LeaseNeeded as again:
                lease = again
        self.protect.starved(lease)

    async def _queued(self, rec: AccessRecord, r: Route, rt: Runtime, over: OverBudget) -> None:
        """Wait in the hold queue of ``over``'s (member x rule) until admitted, or raise the 429
        when ``max_wait`` passes (or the line is full, or a hold outlasts the wait). A cancelled
        wait (the client went away) leaves the line at once."""
        guard, lines = self.protect, self.protect.waiting
        key, rule = over.key, over.rule
        clock = self.connector.loop.time
        deadline = clock() + rule.max_wait
        if over.limit == "hold" and over.wait > rule.max_wait:  # (the origin asked for longer than we wait)
            raise guard.refuse(over)
        waiter = lines.join(key, rec.client, rule.max_queued)
        if waiter is None:
            raise guard.refuse(OverBudget(f"protect {rule.name} (profile {key[0]}, egress {key[1]}): {rule.max_queued} "
                                          f"already wait (queue.max_queued)", key, rule, "queue", 1.0,
                                          "egress_queue_full"))
        outcome = "client_gone"
        try:
            if await lines.turn(key, waiter, deadline - clock()):
                while True:
                    try:
                        try:
                            admit_route(guard, rt.protect, r, rec, turn=True)
                        except LeaseNeeded as lease:
                            await self._leased(rec, r, rt, lease, turn=True)
                        outcome = "admitted_after_wait"
                        return
                    except OverBudget as again:
                        over = again
                    left = deadline - clock()
                    if left <= 0 or (over.limit == "hold" and over.wait > left):
                        break
                    await lines.pause(waiter, min(over.wait, left))
            outcome = "timed_out"
            raise guard.refuse(OverBudget(f"{over.detail}; waited {rule.max_wait:g}s in the queue (queue.max_wait)",
                                          key, rule, over.limit if over.limit != "queued" else "queue", over.wait,
                                          over.reason if over.limit != "queued" else "egress_queue_timeout"))
        finally:
            lines.leave(key, waiter, outcome)
