"""Egress profiles compiled for use: a pool of source addresses or upstream proxies with a
pick strategy (sticky per client or round-robin) and down-marking. No I/O.

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


class ProfilePool:
    """One profile's members and their health. ``plans(client)`` lists the attempts in order."""

    __slots__ = ("name", "kind", "members", "expect_ip", "sticky", "connect_timeout", "_down", "_next",
                 "_clock", "retry_after", "observed_ip", "observed_at", "probe_error")

    def __init__(self, name: str, kind: str, members: list[EgressPlan], expect_ip: tuple[str, ...],
                 sticky: bool, connect_timeout: float, clock: Callable[[], float],
                 retry_after: float = 30.0) -> None:
        self.name = name
        self.kind = kind
        self.members = members
        self.expect_ip = expect_ip
        self.sticky = sticky
        self.connect_timeout = connect_timeout
        self.retry_after = retry_after
        self._down: dict[EgressPlan, float] = {}
        self._next = 0
        self._clock = clock
        self.observed_ip: str | None = None  # filled by the egress probe
        self.observed_at: float | None = None
        self.probe_error: str | None = None

    def plans(self, client: str) -> list[EgressPlan]:
        members = self.members
        if len(members) == 1:
            return members
        if self.sticky:
            start = zlib.crc32(client.encode()) % len(members)
        else:
            start = self._next % len(members)
            self._next += 1
        ordered = members[start:] + members[:start]
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

    @property
    def ip_matches(self) -> bool | None:
        """None when nothing is expected or nothing observed yet."""
        if not self.expect_ip or self.observed_ip is None:
            return None
        return self.observed_ip in self.expect_ip


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
               upstream_password: str | None = None) -> ProfilePool:
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
    return ProfilePool(name, kind, members, tuple(spec.expect_ip), spec.pick == "sticky",
                       spec.connect_timeout or default_timeout, clock)
