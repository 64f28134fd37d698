"""This host's own IP addresses, for ``bind`` entries written as CIDRs ("my address in this
range"), so one config serves every VM of an instance group whose alias IPs differ."""

from __future__ import annotations

import ipaddress
import socket


def local_addresses() -> list[str]:
    """Every address a socket on this host can bind to (IPv4 from the kernel's routing
    table of local addresses, IPv6 from /proc/net/if_inet6)."""
    found: list[str] = []
    try:
        with open("/proc/net/fib_trie", encoding="ascii") as f:
            lines = f.read().splitlines()
        for prev, line in zip(lines, lines[1:], strict=False):
            if line.strip() == "/32 host LOCAL":
                addr = prev.strip().split()[-1]
                if addr not in found:
                    found.append(addr)
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as f:
            for line in f:
                raw = line.split()[0]
                found.append(str(ipaddress.IPv6Address(bytes.fromhex(raw))))
    except OSError:
        pass
    if not found:
        found = [socket.gethostbyname(socket.gethostname())]
    return found


def addresses_in(cidr: str, candidates: list[str] | None = None) -> list[str]:
    net = ipaddress.ip_network(cidr, strict=False)
    pool = candidates if candidates is not None else local_addresses()
    out = [a for a in pool if ipaddress.ip_address(a).version == net.version and ipaddress.ip_address(a) in net]
    # 127.0.0.0/8 routes as a whole on Linux; every address in it is bindable.
    if not out and net.version == 4 and net.subnet_of(ipaddress.ip_network("127.0.0.0/8")) and net.num_addresses == 1:
        out = [str(net.network_address)]
    return sorted(out, key=lambda a: ipaddress.ip_address(a))
