"""``switch: auto``: when does a profile's traffic move to a standby member? Pure: it reads a
pool's egress-IP checks and a board's provider results and returns a value; the caller
(``services.checks.steer``) applies it and reports it.

An active member *fails* when a ``required`` provider refused it on ``failover_after``
consecutive checks (``ProviderBoard.streaks``: an accept resets the count, ``throttled`` is no
verdict and leaves it), or its egress-IP check failed that many times running
(``ProfilePool.fails``). A standby member *passes* when every provider of the profile accepted
its last check and (with ``expect_ip``) its egress IP is attested.

The profile fails over (``Failover``) to the first standby that passes when every active
member fails -- or at once when no active member can carry traffic at all (every one fails
its egress-IP check, so the profile would refuse everything a healthy standby could carry).
Only new connections move (``ProfilePool.relief`` puts the standby first); open tunnels stay
where they are. Nothing here ever moves back: that is an operator's reload. With no standby
that passes, ``stranded`` says why, and a refusing profile's 503 names it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .plan import EgressPlan, ProfilePool
from .providers import ATTESTATION, ProviderBoard, ProviderResult, attestation_failures


@dataclass(frozen=True, slots=True)
class Failover:
    """New connections of ``profile`` move from ``moved_from`` to ``to``; ``evidence``: why each
    member moved from failed, ``trigger``: ``failover_after`` (every active member failed that
    many rounds) or ``refusing`` (no active member could carry traffic at all)."""

    profile: str
    moved_from: tuple[str, ...]
    to: str
    evidence: tuple[ProviderResult, ...]
    trigger: str
    rounds: int

    def event(self) -> dict:
        first = self.evidence[0] if self.evidence else None
        return {"profile": self.profile, "from": list(self.moved_from), "to": self.to,
                "provider": first.provider if first else None, "outcome": first.outcome if first else None,
                "trigger": self.trigger, "failover_after": self.rounds,
                "evidence": [{"member": r.member, "provider": r.provider, "outcome": r.outcome, "detail": r.detail}
                             for r in self.evidence]}


@dataclass(frozen=True, slots=True)
class Decision:
    """What ``decide`` found: a failover to make (or None), and why no standby could take over
    (``stranded``, None when one could or none was needed)."""

    failover: Failover | None
    stranded: str | None


def failures(board: ProviderBoard, pool: ProfilePool, plan: EgressPlan, rounds: int) -> list[ProviderResult]:
    """Why ``plan`` counts as failed: its last result of each required provider that refused it
    ``rounds`` times running, and its egress-IP check if that failed ``rounds`` times running."""
    out = []
    for spec in board.specs.get(pool.name, ()):
        key = (pool.name, plan.label, spec.name)
        r = board.results.get(key)
        if spec.required and r is not None and r.refused and board.streaks.get(key, 0) >= rounds:
            out.append(r)
    if pool.attest and pool.fails.get(plan, 0) >= rounds:
        out += attestation_failures(pool, [plan], 0.0)
    return out


def blockers(board: ProviderBoard, pool: ProfilePool, plan: EgressPlan) -> list[str]:
    """What keeps standby ``plan`` from carrying traffic: every provider must have accepted its
    last check and, with ``expect_ip``, its egress IP be attested (held over an echo outage is not enough)."""
    out = []
    for spec in board.specs.get(pool.name, ()):
        r = board.result(pool.name, plan.label, spec.name)
        if r is None:
            out.append(f"provider {spec.name} has not checked {plan.label} yet")
        elif not r.ok:
            out.append(f"provider {spec.name} refuses {plan.label}: {r.outcome}: {r.detail}")
    if pool.attest and not pool.settled(plan):
        out += [f"{ATTESTATION}: {f.outcome}: {f.detail}" for f in attestation_failures(pool, [plan], 0.0)] or \
            [f"{ATTESTATION}: {plan.label} held over an echo-service outage, not attested"]
    return out


def decide(board: ProviderBoard, pool: ProfilePool) -> Decision:
    """The failover ``pool`` needs now (see the module docstring). Profiles without ``switch:
    auto`` or standby members never fail over."""
    rounds = board.failover_after.get(pool.name)
    if rounds is None or not pool.standby:
        return Decision(None, None)
    relief = pool.relief
    carrying = [relief] if relief is not None else pool.members
    evidence = [f for m in carrying for f in failures(board, pool, m, rounds)]
    failed = all(failures(board, pool, m, rounds) for m in carrying)
    trigger = "failover_after"
    if not failed and relief is None and pool.attest and not pool.healthy:
        failed, trigger = True, "refusing"  # no active member can carry anything: do not wait
        evidence = attestation_failures(pool, pool.members, 0.0)
    if not failed:
        return Decision(None, None)
    why = []
    for plan in pool.standby:
        if plan == relief:
            continue
        blocked = blockers(board, pool, plan)
        if not blocked:
            return Decision(Failover(pool.name, tuple(m.label for m in carrying), plan.label, tuple(evidence),
                                     trigger, rounds), None)
        why.append(blocked[0])
    return Decision(None, "; ".join(why) or "no other standby member")
