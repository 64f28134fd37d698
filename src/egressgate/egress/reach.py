"""One way out: ``Reach.open(member, dest, guard, timeout)`` -> a connected ``Upstream`` that
carries bytes to ``dest`` through egress member ``member``:

- direct and ``bind`` members: a connection to ``dest``'s address, from the member's source
  address when it has one (``dialer.Dialer``, the only code opening outbound sockets);
- ``upstream`` members: a connection to the member's chained proxy, then ``CONNECT dest``
  through it (``chain.open_tunnel``); with ``tunnel=False`` the connection to the chained
  proxy itself (the proxy's forwarded requests, sent in absolute form to it).

The address guard is an explicit argument, always one of three things:

- an ``AddressGuard`` (the provider checks): reach resolves a name itself and dials only the
  addresses the guard passes, ``AddressProhibited`` when none does. Through a chained proxy an
  IP literal is judged and a name is left to that proxy's resolver, as the proxy does;
- ``JUDGED`` (the proxy's connector): the caller judged ``addresses`` already (``policy.judge``:
  the guard and the client's deny rules) and reach dials exactly those;
- ``Unguarded(why)`` (the egress-IP probe, the token keys): the destination is named by the
  operator's config, like a chained proxy, and no guard applies.

A chained proxy's own address is operator-configured: it is resolved and dialed unguarded.
Every user declares its guard as a module constant (or, for the checks, the runtime's guard),
so a test can see which one it passes (``tests/integration/test_one_way_out.py``).

What the far end sent before its owner attached (a server that speaks first; the tunnel's first
bytes after a chained proxy's 200) is ``up.take_early()``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from ..errors import AddressProhibited
from ..model import HostPort
from ..policy.guard import AddressGuard
from .chain import open_tunnel
from .dialer import Dialer
from .plan import EgressPlan
from .upstream import Upstream


@dataclass(frozen=True, slots=True)
class Unguarded:
    """No address guard: ``why`` says who named the destination (the operator's config)."""

    why: str


class Judged:
    """The caller judged the addresses it passes (the proxy's route, ``policy.judge``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "JUDGED"


JUDGED = Judged()
Guard = AddressGuard | Judged | Unguarded


class Reach:
    """The way out, shared by every user: ``dialer`` opens the sockets, ``resolve(name)`` looks
    names up (the gateway's resolver as it is now: a reload may replace it)."""

    __slots__ = ("dialer", "resolve")

    def __init__(self, dialer: Dialer, resolve: Callable[[str], Awaitable[list[str]]]) -> None:
        self.dialer = dialer
        self.resolve = resolve

    def open(self, member: EgressPlan, dest: HostPort, guard: Guard, timeout: float,
             addresses: Sequence[str] | None = None, factory: Callable[[], Upstream] = Upstream,
             tunnel: bool = True, chain_timeout: float | None = None) -> Awaitable[Upstream]:
        """A connection through ``member`` to ``dest`` (``timeout``: the dial's; ``chain_timeout``:
        a chained proxy's CONNECT answer, default ``timeout``), to await. Raises the dial's typed
        errors (``UpstreamError`` and kin, ``SourceUnavailable``, ``DnsError``), ``AddressProhibited``,
        and ``chain.TunnelRefused`` when a chained proxy refuses the CONNECT. (A plain function: the
        proxy's common case, judged addresses from no chained proxy, is the dial itself.)"""
        if guard is JUDGED and member.upstream is None:
            return self.dialer.connect(member, addresses, dest.port, factory, timeout)
        return self._open(member, dest, guard, timeout, addresses, factory, tunnel, chain_timeout)

    async def _open(self, member: EgressPlan, dest: HostPort, guard: Guard, timeout: float,
                    addresses: Sequence[str] | None, factory: Callable[[], Upstream], tunnel: bool,
                    chain_timeout: float | None) -> Upstream:
        proxy = member.upstream
        if proxy is None:
            if guard is not JUDGED:
                addresses = await self._judge(dest, guard)
            return await self.dialer.connect(member, addresses, dest.port, factory, timeout)
        if tunnel and dest.is_ip and isinstance(guard, AddressGuard):
            why = guard.check(dest.host)
            if why is not None:
                raise AddressProhibited(f"{dest.host} is refused by the address guard ({why})")
        at = proxy.address
        hops = [at.host] if at.is_ip else await self.resolve(at.host)
        up = await self.dialer.connect(member, hops, at.port, factory, timeout)
        if tunnel:
            up.early = await open_tunnel(up, dest, proxy.authorization,
                                         timeout if chain_timeout is None else chain_timeout)
        return up

    async def _judge(self, dest: HostPort, guard: AddressGuard | Unguarded) -> list[str]:
        addresses = [dest.host] if dest.is_ip else await self.resolve(dest.host)
        if isinstance(guard, Unguarded):
            return addresses
        usable = [a for a in addresses if guard.check(a) is None]
        if not usable:
            refused = ", ".join(f"{a} ({guard.check(a)})" for a in addresses[:3])
            raise AddressProhibited(f"{dest.host} is refused by the address guard: {refused}" if dest.is_ip else
                                    f"{dest.host} resolves only to addresses the guard refuses: {refused}")
        return usable
