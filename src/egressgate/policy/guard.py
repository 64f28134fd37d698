"""The address guard: which resolved addresses a client may never reach; and the name guard:
which names stand for such addresses whatever a resolver says.

Applied to every address a destination resolves to (and to IP literals), after DNS, so a
public name that resolves to 10.0.0.1 or 169.254.169.254 is refused. IPv6 addresses that
embed an IPv4 address are judged by the IPv4 address they embed: IPv4-mapped
(``::ffff:0:0/96``), IPv4-translated (``::ffff:0:0:0/96``, RFC 2765/6145), the NAT64
well-known prefix (``64:ff9b::/96``, RFC 6052), 6to4 (``2002::/16``) and the local-use NAT64
prefix (``64:ff9b:1::/48``, RFC 8215) once the operator names their prefix in
``allow_private`` (its length says where the IPv4 address sits; unnamed, the local-use
range is refused whole). ``allow_private`` CIDRs are exempt (tests, on-premises origins);
an embedded IPv4 address is exempt only when it is itself in one.

``NameGuard`` refuses by name what the address guard would refuse by address, for
destinations whose addresses the gateway never sees: a chained (upstream) profile sends the
name to its proxy, which resolves it on its side (``localhost`` there is that proxy's
loopback). Refused: ``localhost`` and ``*.localhost`` (RFC 6761), single-label names
(completed by a search list into the proxy's own domain), and names under suffixes used
only inside networks (``INTERNAL_SUFFIXES``), plus the operator's ``security.deny_suffixes``;
``security.allow_suffixes`` exempts names. Names arrive normalised (``model.HostPort``: lower
case, no trailing dot, IDNA as ASCII), so ``LOCALHOST.`` is ``localhost``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IP = ipaddress.IPv4Address | ipaddress.IPv6Address

# IANA IPv4/IPv6 special-purpose registries, grouped by the reason we give.
_RANGES: tuple[tuple[str, str], ...] = (
    ("169.254.169.254/32", "metadata"),
    ("fd00:ec2::254/128", "metadata"),
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "cgnat"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link_local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"),
    ("192.0.2.0/24", "documentation"),
    ("192.31.196.0/24", "reserved"),
    ("192.52.193.0/24", "reserved"),
    ("192.88.99.0/24", "reserved"),
    ("192.168.0.0/16", "private"),
    ("192.175.48.0/24", "reserved"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "reserved"),  # deprecated IPv4-compatible
    ("100::/64", "reserved"),
    ("2001::/23", "reserved"),  # IETF protocol assignments, Teredo included
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "reserved"),
    ("fc00::/7", "private"),
    ("fe80::/10", "link_local"),
    ("fec0::/10", "link_local"),
    ("ff00::/8", "multicast"),
)
_NETS = tuple((ipaddress.ip_network(cidr), why) for cidr, why in _RANGES)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix: the IPv4 in the last 32 bits
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # RFC 2765/6145 IPv4-translated: likewise
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215 local-use: any RFC 6052 prefix length
_6TO4 = ipaddress.ip_network("2002::/16")

# Names that mean the cloud metadata service whatever a resolver says.
METADATA_NAMES = frozenset({"metadata.google.internal", "metadata", "metadata.goog", "instance-data",
                            "instance-data.ec2.internal"})


# Suffixes that name hosts inside a network, never on the public internet: RFC 6761
# (localhost), RFC 6762 (local, and appendix G's intranet, internal, private, corp, home, lan),
# RFC 8375 (home.arpa), localdomain, and Kubernetes service names (svc; cluster.local is under
# local). ICANN reserved .internal for private use (2024).
INTERNAL_SUFFIXES: tuple[str, ...] = ("localhost", "localdomain", "local", "internal", "intranet", "private",
                                      "corp", "home", "lan", "home.arpa", "svc")


class NameGuard:
    """``check(host)`` returns None for a name that may be sent on, else why not. ``scope``:
    ``upstream`` (checked for chained profiles only; direct ones are judged by address after
    DNS) or ``all`` (every profile, before DNS)."""

    __slots__ = ("_deny", "_allow", "_cache", "everywhere")

    def __init__(self, deny_suffixes: Iterable[str] = (), allow_suffixes: Iterable[str] = (),
                 scope: str = "upstream") -> None:
        self._deny = frozenset((*INTERNAL_SUFFIXES, *deny_suffixes))
        self._allow = frozenset(allow_suffixes)
        self._cache: dict[str, str | None] = {}
        self.everywhere = scope == "all"

    def check(self, host: str) -> str | None:
        try:
            return self._cache[host]
        except KeyError:
            pass
        verdict = self._judge(host)
        if len(self._cache) > 8192:
            self._cache.clear()
        self._cache[host] = verdict
        return verdict

    def _judge(self, host: str) -> str | None:
        suffixes = _suffixes(host)
        if not self._allow.isdisjoint(suffixes):
            return None
        if "." not in host:
            return "a localhost name" if host == "localhost" else "a single-label name"
        for suffix in suffixes:
            if suffix in self._deny:
                return "a localhost name" if suffix == "localhost" else f"an internal name (*.{suffix})"
        return None


def _suffixes(host: str) -> list[str]:
    """``a.b.c`` -> ``["a.b.c", "b.c", "c"]``."""
    out = [host]
    dot = host.find(".")
    while dot >= 0:
        out.append(host[dot + 1:])
        dot = host.find(".", dot + 1)
    return out


def embedded_ipv4(ip: IP) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, where the place of it is fixed: mapped,
    translated, the NAT64 well-known prefix and 6to4 (None otherwise; see ``_local_nat64``)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64 or ip in _TRANSLATED:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _6TO4:
        return ip.sixtofour
    return None


_RFC6052_LENGTHS = frozenset({48, 56, 64, 96})  # the prefix lengths a /48 can hold


def rfc6052_ipv4(ip: ipaddress.IPv6Address, prefix_length: int) -> ipaddress.IPv4Address:
    """RFC 6052 section 2.2: the IPv4 address behind a NAT64 prefix of this length (48, 56,
    64 or 96 bits). Bits 64-71 (the "u" octet) never carry any of it."""
    n = int(ip)
    if prefix_length == 96:
        v4 = n & 0xFFFFFFFF  # bits 96-127
    elif prefix_length == 64:
        v4 = (n >> 24) & 0xFFFFFFFF  # bits 72-103
    elif prefix_length == 56:
        v4 = ((n >> 64) & 0xFF) << 24 | (n >> 32) & 0xFFFFFF  # bits 56-63, 72-95
    elif prefix_length == 48:
        v4 = ((n >> 64) & 0xFFFF) << 16 | (n >> 40) & 0xFFFF  # bits 48-63, 72-87
    else:
        raise ValueError(f"not an RFC 6052 prefix length for 64:ff9b:1::/48: {prefix_length}")
    return ipaddress.IPv4Address(v4)


class AddressGuard:
    """``check(ip)`` returns None for an address a client may reach, else the reason."""

    __slots__ = ("_exempt", "_cache")

    def __init__(self, allow_private: Iterable[str] = ()) -> None:
        self._exempt = tuple(ipaddress.ip_network(c) for c in allow_private)
        self._cache: dict[str, str | None] = {}

    def check(self, address: str) -> str | None:
        try:
            return self._cache[address]
        except KeyError:
            pass
        verdict = self._classify(ipaddress.ip_address(address))
        if len(self._cache) > 8192:
            self._cache.clear()
        self._cache[address] = verdict
        return verdict

    def _classify(self, ip: IP) -> str | None:
        if ip.version == 6 and ip in _NAT64_LOCAL:
            return self._local_nat64(ip)
        inner = embedded_ipv4(ip)
        if inner is None:
            return None if self._exempted(ip) else _special(ip)
        # An IPv6 form of an IPv4 address is that IPv4 address: exempt when it is (an exempted
        # IPv6 range does not exempt what its addresses carry).
        return None if self._exempted(inner) else _special(inner)

    def _local_nat64(self, ip: ipaddress.IPv6Address) -> str | None:
        """RFC 8215 local-use NAT64 (64:ff9b:1::/48): the operator chooses the prefix and so
        where the IPv4 address sits. An ``allow_private`` network inside 64:ff9b:1::/48 of an
        RFC 6052 length (/48, /56, /64, /96) is such a prefix: its addresses are judged by the
        IPv4 address at that place. Otherwise the address is refused whole ("private": not
        globally reachable), naming the embedded class when the /96 place holds a special
        IPv4 address, unless a wider network is exempt."""
        wide = False
        for net in self._exempt:
            if net.version == 6 and ip in net:
                if net.prefixlen in _RFC6052_LENGTHS and net.subnet_of(_NAT64_LOCAL):
                    inner = rfc6052_ipv4(ip, net.prefixlen)
                    return None if self._exempted(inner) else _special(inner)
                wide = True
        if wide:
            return None
        why = _special(rfc6052_ipv4(ip, 96))
        return why if why is not None and why != "unspecified" else "private"

    def _exempted(self, ip: IP) -> bool:
        return any(ip.version == net.version and ip in net for net in self._exempt)


def _special(ip: IP) -> str | None:
    for net, why in _NETS:
        if ip.version == net.version and ip in net:
            return why
    return None


def classify(address: str) -> str | None:
    """The special-purpose class of an address ("private", "loopback", ...), or None if public."""
    return AddressGuard()._classify(ipaddress.ip_address(address))


@dataclass(frozen=True, slots=True)
class OwnListeners:
    """The gateway's own listening sockets (proxy and admin), which no client may reach
    through it whatever ``allow_private`` says: a proxied ``POST /-/reload`` must never
    arrive at the admin listener. ``exact`` holds (address, port) of listeners bound to one
    address; ``any_port`` the ports of listeners bound to every address, reachable through any
    of ``local`` (this host's addresses), the loopback ranges and the unspecified address."""

    exact: frozenset[tuple[str, int]] = frozenset()
    any_port: frozenset[int] = frozenset()
    local: frozenset[str] = frozenset()
    exact_ports: frozenset[int] = frozenset()  # the ports in ``exact`` (most requests: none of ours)

    def contains(self, address: str, port: int) -> bool:
        if port not in self.any_port and port not in self.exact_ports:
            return False
        ip = ipaddress.ip_address(address)
        inner = embedded_ipv4(ip)
        for candidate in (ip, inner) if inner is not None else (ip,):
            text = str(candidate)
            if (text, port) in self.exact:
                return True
            if port in self.any_port and (candidate.is_loopback or candidate.is_unspecified or text in self.local):
                return True
        return False

    @classmethod
    def of(cls, bound: list[tuple[str, int]], local: list[str]) -> OwnListeners:
        exact = frozenset((str(ipaddress.ip_address(h)), p) for h, p in bound
                          if not ipaddress.ip_address(h).is_unspecified)
        any_port = frozenset(p for h, p in bound if ipaddress.ip_address(h).is_unspecified)
        return cls(exact, any_port, frozenset(local), frozenset(p for _, p in exact))
