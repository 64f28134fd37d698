"""Provider checks shared by a fleet (``fleet.redis``): one process of the whole fleet checks a
(member x provider) per interval, every other process reads its result, so M instances of N
workers do not hit a provider M x N times per interval.

A pair is named by the profile, the provider's settings (URL, method, accepted statuses,
headers, body rules: a changed provider is a new name, checked afresh) and the member's public
identity: the egress IP its last attestation saw (``expect_ip``), which is the same on every
VM behind one NAT IP, else its label (a chained proxy's URL, a source address).

``split`` sorts a round's pairs: a result another process saved less than an interval ago is
taken (``ProviderResult``, detail naming the instance that checked); else the first process to
claim the pair checks it (``go``) and ``save`` publishes its results; a process that finds the
pair claimed waits a moment for the result, then takes whatever result there is. The store
slow or down: every process checks for itself (the ``fleet.redis.timeout`` bound applies to
each store call), as it does without a fleet store.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Protocol

from ..egress.plan import EgressPlan, ProfilePool
from ..egress.providers import ProviderResult, ProviderSpec
from .redisstore import StoreError

POLL = 0.25  # seconds between looks for a result another process is making


class CheckStore(Protocol):
    async def claim_check(self, name: str, ms: int) -> bool: ...
    async def check_result(self, name: str) -> dict | None: ...
    async def save_check(self, name: str, doc: dict, ms: int) -> None: ...


Pair = tuple[EgressPlan, ProviderSpec]


def pair_name(pool: ProfilePool | None, plan: EgressPlan, spec: ProviderSpec) -> str:
    identity = (pool.attested_ip(plan) if pool is not None else None) or plan.label
    body = "" if spec.body is None else repr(([p.pattern for p in spec.body.refuse],
                                              spec.body.expect.pattern if spec.body.expect else None))
    text = "\n".join((plan.profile, identity, spec.name, spec.url, spec.method, repr(spec.accept),
                      repr(spec.headers), body))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class SharedChecks:
    def __init__(self, store: CheckStore) -> None:
        self.store = store

    async def split(self, pools: dict[str, ProfilePool], pairs: list[Pair]) -> tuple[list[Pair], list[ProviderResult]]:
        """(the pairs this process checks, the results taken from other processes)."""
        go: list[Pair] = []
        got: list[ProviderResult] = []
        for plan, spec in pairs:
            name = pair_name(pools.get(plan.profile), plan, spec)
            try:
                result = await self._shared(name, plan, spec)
            except StoreError:
                go.append((plan, spec))
                continue
            if result is None:
                go.append((plan, spec))
            elif result is not False:
                got.append(result)
        return go, got

    async def _shared(self, name: str, plan: EgressPlan, spec: ProviderSpec) -> ProviderResult | None | bool:
        """A fresh result of another process; None: check it here (claimed); False: nothing
        to record this round (another process claimed it and has no result yet)."""
        doc = await self.store.check_result(name)
        if _fresh(doc, spec):
            return _result(doc, plan, spec)
        if await self.store.claim_check(name, int(spec.interval * 1000)):
            return None
        deadline = time.monotonic() + spec.timeout + 1.0
        while time.monotonic() < deadline:
            await asyncio.sleep(POLL)
            later = await self.store.check_result(name)
            if _fresh(later, spec):
                return _result(later, plan, spec)
        return _result(doc, plan, spec) if doc is not None and _valid(doc) else False

    async def save(self, pools: dict[str, ProfilePool], pairs: list[Pair], results: list[ProviderResult]) -> None:
        """Publish what this process checked (``results`` in the order of ``pairs``)."""
        for (plan, spec), r in zip(pairs, results, strict=True):
            if r.outcome == "throttled" and r.status is None:  # (held by this process's own protect)
                continue
            try:
                await self.store.save_check(pair_name(pools.get(plan.profile), plan, spec), {
                    "outcome": r.outcome, "detail": r.detail, "at": r.at, "status": r.status,
                    "remote_addr": r.remote_addr, "duration_ms": r.duration_ms, "retry_after": r.retry_after},
                    int(spec.interval * 2000 + spec.timeout * 1000))
            except StoreError:
                return  # (the others check for themselves until the store answers)


def _valid(doc: dict | None) -> bool:
    return (isinstance(doc, dict) and isinstance(doc.get("outcome"), str) and isinstance(doc.get("detail"), str)
            and isinstance(doc.get("at"), int | float))


def _fresh(doc: dict | None, spec: ProviderSpec) -> bool:
    return _valid(doc) and time.time() - doc["at"] < spec.interval


def _result(doc: dict, plan: EgressPlan, spec: ProviderSpec) -> ProviderResult:
    status, retry = doc.get("status"), doc.get("retry_after")
    remote = doc.get("remote_addr")
    return ProviderResult(plan.profile, plan.label, spec.name, doc["outcome"][:32],
                          f"{doc['detail'][:400]} (checked by instance {str(doc.get('by', '?'))[:64]})",
                          float(doc["at"]), status if isinstance(status, int) else None, None,
                          remote if isinstance(remote, str) else None,
                          float(doc.get("duration_ms") or 0.0) if isinstance(doc.get("duration_ms"), int | float) else 0.0,
                          float(retry) if isinstance(retry, int | float) else None)
