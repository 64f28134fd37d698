"""Routing one request: (request head, identity, runtime) -> a ``Route`` value, or a typed
refusal (``GatewayError`` with its status and reason). No callbacks, no I/O of its own:

1. ``route``: the destination (CONNECT authority or absolute URI), the policy decision
   (``policy.decide``), the egress profile and its members in the order to try them
   (``ProfilePool.plans``, asked once per request: a round-robin pool advances once), and
   the profile's health (fail closed on an unverified egress IP);
2. the destination's addresses: an IP literal as it is, a name from the resolver's cache
   when it is there (``cached_addresses``), else looked up (``resolve_and_judge`` awaits);
3. ``judge`` (``policy.judge``): the guard and the client's IP deny rules on those addresses;
   the route then carries exactly the addresses that may be dialed.

Through a chained proxy the name is resolved by that proxy (its DNS view may differ from
ours): the guard applies here to IP-literal destinations; names are judged by the policy
(metadata names included) and by the name guard (``policy.guard.NameGuard``: localhost,
single-label and internal names never reach the chained proxy; with
``security.internal_names: all`` that applies to every profile, before DNS).

The caller's fast path is simply "every step finished without awaiting".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..egress.plan import EgressPlan, ProfilePool
from ..errors import AddressProhibited, ClientProtocolError, EgressUnverified, NameProhibited, PolicyDenied
from ..http1.parse import RequestHead
from ..http1.rewrite import AbsoluteTarget, parse_absolute_target
from ..model import HostPort
from ..policy.clients import ClientPolicy, Identity
from ..policy.decide import decide
from ..policy.guard import OwnListeners
from ..policy.judge import judge
from .runtime import Runtime

WHOAMI_HOST = "egressgate.whoami"
NAME_LIMIT = 64  # client-supplied names (a requested profile) as they appear in answers and records


class Route:
    """Where one request goes. ``addresses`` is None until the destination's addresses are
    judged (and stays None through a chained proxy, which resolves names itself)."""

    __slots__ = ("client", "dest", "target", "pool", "plans", "would_deny", "addresses", "whoami", "resolved")

    def __init__(self, client: ClientPolicy, dest: HostPort, target: AbsoluteTarget | None,
                 pool: ProfilePool | None, plans: list[EgressPlan], would_deny: str | None,
                 whoami: bool = False) -> None:
        self.client = client
        self.dest = dest
        self.target = target
        self.pool = pool
        self.plans = plans
        self.would_deny = would_deny
        self.addresses: tuple[str, ...] | None = None
        self.whoami = whoami
        self.resolved: list[str] | None = None  # a name's addresses as looked up (before judging)

    @property
    def chained(self) -> bool:
        return self.pool is not None and self.pool.kind == "upstream"

    @property
    def ready(self) -> bool:
        """Nothing is left to look up: the route can be dialed."""
        return self.addresses is not None or self.chained


def route(head: RequestHead, connect: bool, identity: Identity, rt: Runtime, listener_default: str,
          own: OwnListeners, socks: bool = False) -> Route:
    """Steps 1 (and 3 for IP literals). Raises ``PolicyDenied`` / ``AddressProhibited`` (403),
    ``EgressUnverified`` (503), or a ``ClientProtocolError`` (400) for a bad target or a
    CONNECT to ``egressgate.whoami`` (answered only as plain HTTP)."""
    client = identity.client
    if connect:
        dest, target = HostPort.parse_authority(head.target), None
    else:
        target = parse_absolute_target(head.target)
        dest = target.dest
    if dest.host == WHOAMI_HOST:
        if connect:  # the gateway answers it itself, in plain HTTP: a tunnel has nothing to reach
            raise ClientProtocolError(f"{WHOAMI_HOST} answers plain HTTP only: use http://{WHOAMI_HOST}/ "
                                      f"(e.g. curl -x \"$HTTPS_PROXY\" http://{WHOAMI_HOST}/)",
                                      reason="whoami_over_connect")
        return Route(client, dest, target, None, [], None, whoami=True)
    requested = requested_profile(identity, head)
    decision = decide(client, dest, connect, requested, listener_default,
                      rt.socks_ports if socks else rt.connect_ports, socks)
    if not decision.allow:
        kind = AddressProhibited if decision.reason == "destination_ip_prohibited" else PolicyDenied
        if decision.reason == "profile_not_allowed":
            detail = f"profile {clip(decision.profile)!r} is not allowed for client {client.name} ({decision.rule})"
        else:
            detail = f"{dest} for client {client.name} ({decision.rule})"
        raise kind(f"{decision.reason}: {detail}", reason=decision.reason,
                   profile=clip(decision.profile) if decision.profile else None)
    pool = rt.profiles[decision.profile]
    if not dest.is_ip and (pool.kind == "upstream" or rt.names.everywhere):
        why = rt.names.check(dest.host)
        if why is not None:  # a safety check: report mode does not relax it
            where = "upstream proxy" if pool.kind == "upstream" else "resolver"
            raise NameProhibited(f"{dest.host} is {why}: not sent to the {where} (security.allow_suffixes exempts "
                                 "names)", profile=pool.name)
    if not pool.healthy:  # fail closed: never leave from an IP the config does not promise
        reason, detail = pool.refusal()
        raise EgressUnverified(detail, reason=reason, profile=pool.name)
    r = Route(client, dest, target, pool, pool.plans(client.name),
              decision.reason if decision.report_only else None)
    if dest.is_ip:
        judged(r, (dest.host,), rt, own)
    return r


def requested_profile(identity: Identity, head: RequestHead) -> str | None:
    """The profile the client asked for: ``user+profile`` first, else ``X-Egressgate-Profile``."""
    if identity.requested_profile is not None:
        return identity.requested_profile
    return head.profile.decode("latin-1").strip() if head.profile else None


def cached_addresses(r: Route, cached: Callable[[str], list[str] | None], rt: Runtime, own: OwnListeners) -> bool:
    """Step 2 and 3 from the resolver's cache; False when a lookup must be awaited."""
    if r.ready:
        return True
    addresses = cached(r.dest.host)
    if addresses is None:
        return False
    r.resolved = addresses
    judged(r, addresses, rt, own)
    return True


async def resolve_and_judge(r: Route, resolve: Callable[[str], Awaitable[list[str]]], rt: Runtime,
                            own: OwnListeners) -> None:
    """Steps 2 and 3 with a lookup (raises ``DnsError`` and friends, or the refusal)."""
    if not r.ready:
        r.resolved = addresses = await resolve(r.dest.host)
        judged(r, addresses, rt, own)


def judged(r: Route, addresses, rt: Runtime, own: OwnListeners) -> None:
    j = judge(r.dest, addresses, r.client, rt.guard, own)
    if j.refusal is not None:
        j.refusal.profile = r.pool.name  # (the record names the profile it was refused under)
        raise j.refusal
    if j.would_deny and r.would_deny is None:
        r.would_deny = j.would_deny
    if not r.chained:
        r.addresses = j.usable


def clip(name: str, limit: int = NAME_LIMIT) -> str:
    """A client-supplied name as it may appear in a response, a record or a label: bounded."""
    return name if len(name) <= limit else name[:limit] + "..."
