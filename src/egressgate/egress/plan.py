"""Egress profiles compiled for use: a pool of source addresses or upstream proxies with a
pick strategy (sticky per client, round-robin, or failover in the listed order) and
down-marking. No I/O.

``EgressPlan`` is what one connection attempt uses: a profile name and either nothing
(direct), a local source address (bind) or an upstream proxy.
"""

from __future__ import annotations

import base64
import dataclasses
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from ..model import UpstreamProxy


@dataclass(frozen=True, slots=True)
class EgressPlan:
    profile: str
    kind: str  # "direct" | "bind" | "upstream"
    source: str | None = None
    upstream: UpstreamProxy | None = None

    @property
    def label(self) -> str:
        """How this member is named in metrics, status and probe output."""
        if self.source:
            return self.source
        if self.upstream:
            return str(self.upstream)
        return "direct"

    @property
    def key(self) -> tuple[str, str | None, str | None]:
        """What makes two plans interchangeable for reusing an idle upstream connection."""
        return (self.kind, self.source, str(self.upstream) if self.upstream else None)


@dataclass(frozen=True, slots=True)
class Attestation:
    """What the egress probe saw for one member: the IP the echo service reported, or why
    there is none."""

    observed: str | None
    error: str | None
    at: float
    # The check failed (no echo service answered) but the member keeps its last good attestation
    # (``observed``, checked at ``good_at``) within ``probe.grace``.
    held: bool = False
    good_at: float | None = None


class ProfilePool:
    """One profile's members and their health. ``plans(client)`` lists the attempts in order.

    Attestation (fail closed): when the profile names ``expect_ip`` and the gateway can check it
    (``attest``), only members whose last probe saw an expected IP are used. A member never
    checked, whose check failed, or that exits from another IP is left out; with none left the
    profile refuses its traffic (``refusal``) until a check passes. Other profiles are unaffected.

    Standby members (``standby``) carry no traffic: they are attested and checked like the
    active ones so that a promotion (a reload moving one to the active members) or a failover
    (``relief``, set by ``switch: auto``) lands on a member already known to pass. With a
    ``relief`` member, new connections try it first and the active members after it.
    """

    __slots__ = ("name", "kind", "members", "expect_ip", "pick", "connect_timeout", "_down", "_next",
                 "_clock", "retry_after", "attest", "checks", "_usable", "observed_at", "grace", "avoid",
                 "standby", "relief", "fails", "stranded", "relief_view")

    def __init__(self, name: str, kind: str, members: list[EgressPlan], expect_ip: tuple[str, ...],
                 pick: str | bool, connect_timeout: float, clock: Callable[[], float],
                 retry_after: float = 30.0, attest: bool = False, grace: float = 0.0,
                 standby: list[EgressPlan] | None = None) -> None:
        self.name = name
        self.standby: list[EgressPlan] = [m for m in standby or () if m not in members]
        # the standby member carrying new connections after a switch: auto failover (None: the active ones)
        self.relief: EgressPlan | None = None
        self.relief_view: dict | None = None  # the failover that set ``relief`` (its event, and when), for /status
        # consecutive egress-IP checks each member (active or standby) failed (0 once one passes)
        self.fails: dict[EgressPlan, int] = {}
        # switch: auto with every active member failed and no standby passing: why (in the 503's reason)
        self.stranded: str | None = None
        self.grace = grace
        self.kind = kind
        self.members = members
        self.expect_ip = expect_ip
        if isinstance(pick, bool):  # (older callers: True = sticky, False = round_robin)
            pick = "sticky" if pick else "round_robin"
        self.pick = pick
        self.connect_timeout = connect_timeout
        self.retry_after = retry_after
        self._down: dict[EgressPlan, float] = {}
        self._next = 0
        self._clock = clock
        self.attest = attest and bool(expect_ip)
        self.checks: dict[EgressPlan, Attestation] = {}  # filled by the egress probe
        self._usable: list[EgressPlan] = [] if self.attest else members
        self.observed_at: float | None = None
        # members a required provider refuses (``checks``): new connections go to the others first
        self.avoid: frozenset[EgressPlan] = frozenset()

    # --- attestation ---------------------------------------------------------------------
    def record(self, plan: EgressPlan, observed: str | None, error: str | None, now: float) -> None:
        """Store one member's probe result and recompute which members may carry traffic."""
        if plan not in self.members and plan not in self.standby:
            return
        prev = self.checks.get(plan)
        good_at = now if error is None and observed in self.expect_ip else (prev.good_at if prev else None)
        if error is not None and prev is not None and good_at is not None and now - good_at <= self.grace:
            # no answer at all: keep the last good attestation for probe.grace (never a wrong IP)
            self.checks[plan] = Attestation(prev.observed, error, now, held=True, good_at=good_at)
        else:
            self.checks[plan] = Attestation(observed, error, now, good_at=good_at)
        self.observed_at = now
        self.fails[plan] = 0 if self.verified(plan) else self.fails.get(plan, 0) + 1
        if self.attest and plan == self.relief and not self.verified(plan):
            # a failed-over standby that exits from a wrong IP carries nothing (fail closed)
            self.relief = self.relief_view = None
        if self.attest:
            self._usable = [m for m in self.members if self.verified(m)]

    def adopt(self, previous: ProfilePool) -> None:
        """After a reload: keep the results for members that did not change."""
        for plan, check in previous.checks.items():
            if plan in self.members or plan in self.standby:
                self.checks[plan] = check
                self.fails[plan] = previous.fails.get(plan, 0)
        if self.attest:
            self._usable = [m for m in self.members if self.verified(m)]

    def attested_ip(self, plan: EgressPlan) -> str | None:
        """The public IP the last check of this member saw (None: never checked, or it failed).
        Asked once per request for its access record: one dict lookup, none without checks."""
        if not self.checks:
            return None
        check = self.checks.get(plan)
        return check.observed if check is not None else None

    def verified(self, plan: EgressPlan) -> bool:
        check = self.checks.get(plan)
        return check is not None and (check.error is None or check.held) and check.observed in self.expect_ip

    def exits_wrong(self, plan: EgressPlan) -> str | None:
        """The IP ``plan`` was last seen leaving from when it is not one of ``expect_ip`` (a
        definite answer of the echo service, not an outage); else None. Nothing goes out from
        such a member, not even a provider check: it would show the provider an IP it may block."""
        check = self.checks.get(plan) if self.attest else None
        if check is None or check.error is not None or check.observed in self.expect_ip:
            return None
        return check.observed

    def settled(self, plan: EgressPlan) -> bool:
        """Verified by its last check itself (not held over an echo-service outage)."""
        check = self.checks.get(plan)
        return self.verified(plan) and not check.held

    def unchecked(self) -> list[EgressPlan]:
        return [m for m in self.everyone if m not in self.checks]

    @property
    def everyone(self) -> list[EgressPlan]:
        """Every member, active then standby: what the egress-IP and provider checks go through."""
        return self.members + self.standby if self.standby else self.members

    def role(self, plan: EgressPlan) -> str:
        return "standby" if plan in self.standby else "active"

    def carrying(self) -> list[EgressPlan]:
        """The members new connections go to now: a failover's ``relief`` alone, else the usable
        active members a required provider does not refuse (all usable ones if it refuses every
        one). The others are only tried when these fail to connect."""
        if self.relief is not None:
            return [self.relief]
        return [m for m in self._usable if m not in self.avoid] or list(self._usable)

    @property
    def healthy(self) -> bool:
        """False when the profile refuses its traffic (attested, and no member verified)."""
        return not self.attest or bool(self._usable) or self.relief is not None

    def refusal(self) -> tuple[str, str] | None:
        """(reason, detail) when the profile must refuse its traffic, else None."""
        if self.healthy:
            return None
        expected = ", ".join(self.expect_ip)
        for plan in self.members:
            check = self.checks.get(plan)
            if check is not None and check.error is None and check.observed not in self.expect_ip:
                return ("egress_ip_mismatch", f"profile {self.name}: egress IP {check.observed} is not one of "
                        f"[{expected}]" + self._no_standby())
        errors = [c.error for m, c in self.checks.items() if c.error and m in self.members]
        why = f"the last check failed: {errors[0]}" if errors else "not checked yet"
        return ("egress_ip_unverified", f"profile {self.name}: egress IP not verified against [{expected}] ({why})"
                + self._no_standby())

    def _no_standby(self) -> str:
        return f"; no standby member to fail over to: {self.stranded}" if self.stranded else ""

    @property
    def observed_ip(self) -> str | None:
        """The IP seen through the first member that is wrong (or the first member)."""
        checks = [self.checks[m] for m in self.members if m in self.checks]
        bad = [c for c in checks if c.error or c.observed not in self.expect_ip] if self.expect_ip else []
        chosen = bad[0] if bad else (checks[0] if checks else None)
        return chosen.observed if chosen is not None else None

    @property
    def probe_error(self) -> str | None:
        return next((c.error for m, c in self.checks.items() if c.error and m in self.members), None)

    @property
    def ip_matches(self) -> bool | None:
        """None when nothing is expected or nothing observed yet; True only if every checked
        member exits from an expected IP."""
        if not self.expect_ip:
            return None
        checks = [self.checks[m] for m in self.members if m in self.checks]
        if not checks or all(c.error for c in checks):
            return None
        return all(c.error is None and c.observed in self.expect_ip for c in checks)

    # --- choosing members ----------------------------------------------------------------
    def plans(self, client: str) -> list[EgressPlan]:
        if self.relief is not None:  # failed over (switch: auto): the standby first, the active ones after
            return [self.relief, *self._ordered(client)]
        return self._ordered(client)

    def _ordered(self, client: str) -> list[EgressPlan]:
        members = self._usable
        if len(members) <= 1:
            return members
        if self.pick == "sticky":
            start = zlib.crc32(client.encode()) % len(members)
        elif self.pick == "round_robin":
            start = self._next % len(members)
            self._next += 1
        else:  # failover: always the listed order
            start = 0
        ordered = members[start:] + members[:start] if start else list(members)
        if self.avoid:  # refused by a required provider: tried only after every other member
            ordered = [m for m in ordered if m not in self.avoid] + [m for m in ordered if m in self.avoid]
        if not self._down:
            return ordered
        now = self._clock()
        up = [m for m in ordered if self._down.get(m, 0.0) <= now]
        down = [m for m in ordered if self._down.get(m, 0.0) > now]
        return up + down  # down members last: tried only when every other one failed

    def mark_down(self, plan: EgressPlan) -> None:
        self._down[plan] = self._clock() + self.retry_after

    def mark_up(self, plan: EgressPlan) -> None:
        self._down.pop(plan, None)

    def is_down(self, plan: EgressPlan) -> bool:
        return self._down.get(plan, 0.0) > self._clock()


def refusing(pools: dict[str, ProfilePool]) -> dict[str, str]:
    """The profiles that refuse all their traffic (no attested member), each with why."""
    return {name: why[1] for name, pool in pools.items() if (why := pool.refusal()) is not None}


def upstream_with_password(url: str, password: str | None) -> UpstreamProxy:
    """The upstream proxy of ``url``; with ``password`` (read from a file or the environment),
    the user named in the URL authenticates with it instead of a password in the URL."""
    proxy = UpstreamProxy.parse(url)
    user = urlsplit(url).username
    if password is None or user is None:
        return proxy
    token = base64.b64encode(f"{unquote(user)}:{password}".encode()).decode()
    return dataclasses.replace(proxy, authorization="Basic " + token)


def build_pool(name: str, spec: object, local_addresses: Callable[[str], list[str]],
               default_timeout: float, clock: Callable[[], float],
               upstream_password: str | None = None, attest: bool = False, grace: float = 0.0) -> ProfilePool:
    """``spec`` is a ``ProfileConfig``; ``local_addresses(cidr)`` lists this host's addresses in
    a range (for ``bind`` entries written as CIDRs); ``upstream_password`` is the secret of the
    user in the profile's upstream URLs (``upstream_password_file`` / ``_env``), if any."""
    kind = spec.kind
    members: list[EgressPlan] = []
    if kind == "bind":
        for entry in spec.bind:
            sources = local_addresses(entry) if "/" in entry else [entry]
            members += [EgressPlan(name, "bind", source=s) for s in sources]
        if not members:
            members = [EgressPlan(name, "bind", source=spec.bind[0].split("/")[0])]
    elif kind == "upstream":
        members = [EgressPlan(name, "upstream", upstream=upstream_with_password(u, upstream_password))
                   for u in spec.upstream]
    else:
        members = [EgressPlan(name, "direct")]
    standby: list[EgressPlan] = []
    for entry in getattr(spec, "standby", ()) if kind != "direct" else ():
        if kind == "upstream":
            standby.append(EgressPlan(name, "upstream", upstream=upstream_with_password(entry, upstream_password)))
        else:
            sources = local_addresses(entry) if "/" in entry else [entry]
            standby += [EgressPlan(name, "bind", source=s) for s in sources or [entry.split("/")[0]]]
    pick = spec.pick or ("failover" if kind == "upstream" else "sticky")
    return ProfilePool(name, kind, members, tuple(spec.expect_ip), pick,
                       spec.connect_timeout or default_timeout, clock, attest=attest, grace=grace,
                       standby=standby)
