"""Destination rules compiled once: exact names in a set, ``*.suffix`` by walking labels,
CIDRs in a list, each with an optional port. Matching costs O(labels), not O(rules)."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

from ..model import DestPattern
from .guard import embedded_ipv4

_parse_ip = functools.lru_cache(maxsize=4096)(ipaddress.ip_address)  # destinations repeat


class RuleSet:
    __slots__ = ("_any", "_exact", "_suffix", "_nets", "ports", "empty")

    def __init__(self, patterns: Iterable[str]) -> None:
        self._any: dict[int | None, str] = {}
        self._exact: dict[str, dict[int | None, str]] = {}
        self._suffix: dict[str, dict[int | None, str]] = {}
        self._nets: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None, str]] = []
        ports: set[int] = set()
        count = 0
        for text in patterns:
            count += 1
            p = DestPattern.parse(text)
            if p.port is not None:
                ports.add(p.port)
            if p.kind == "any":
                self._any.setdefault(p.port, text)
            elif p.kind == "exact":
                self._exact.setdefault(p.value, {}).setdefault(p.port, text)
            elif p.kind == "suffix":
                self._suffix.setdefault(p.value, {}).setdefault(p.port, text)
            else:
                self._nets.append((ipaddress.ip_network(p.value), p.port, text))
        self.ports = frozenset(ports)  # ports named explicitly (CONNECT may use them)
        self.empty = count == 0

    @staticmethod
    def _by_port(table: dict[int | None, str], port: int) -> tuple[str, bool] | None:
        rule = table.get(port)
        if rule is not None:
            return rule, True
        rule = table.get(None)
        return (rule, False) if rule is not None else None

    def match(self, host: str, port: int, is_ip: bool) -> str | None:
        """The text of the first rule that matches ``host:port``, or None."""
        found = self.match_rule(host, port, is_ip)
        return found[0] if found else None

    def match_rule(self, host: str, port: int, is_ip: bool) -> tuple[str, bool] | None:
        """(rule text, whether the rule names this port explicitly) for the first match."""
        if self._any and (found := self._by_port(self._any, port)):
            return found
        if is_ip:
            return self._match_ip(host, port)
        table = self._exact.get(host)
        if table and (found := self._by_port(table, port)):
            return found
        if self._suffix:
            dot = host.find(".")
            while dot >= 0:
                table = self._suffix.get(host[dot:])
                if table and (found := self._by_port(table, port)):
                    return found
                dot = host.find(".", dot + 1)
        return None

    def match_ip(self, address: str, port: int) -> str | None:
        found = self._match_ip(address, port)
        return found[0] if found else None

    def _match_ip(self, address: str, port: int) -> tuple[str, bool] | None:
        if not self._nets:
            return None
        ip = _parse_ip(address)
        inner = embedded_ipv4(ip)  # ::ffff:a.b.c.d, NAT64 and 6to4 forms match IPv4 rules too
        for net, net_port, text in self._nets:
            if net_port is not None and net_port != port:
                continue
            for candidate in (ip, inner):
                if candidate is not None and candidate.version == net.version and candidate in net:
                    return text, net_port is not None
        return None
