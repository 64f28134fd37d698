"""Destination rules compiled once: exact names in a set, ``*.suffix`` by walking labels,
CIDRs in a list, each with an optional port. Matching costs O(labels), not O(rules)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from ..model import DestPattern


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
    def _by_port(table: dict[int | None, str], port: int) -> str | None:
        return table.get(port) or table.get(None)

    def match(self, host: str, port: int, is_ip: bool) -> str | None:
        """The text of the first rule that matches ``host:port``, or None."""
        if self._any and (rule := self._by_port(self._any, port)):
            return rule
        if is_ip:
            return self.match_ip(host, port)
        table = self._exact.get(host)
        if table and (rule := self._by_port(table, port)):
            return rule
        if self._suffix:
            dot = host.find(".")
            while dot >= 0:
                table = self._suffix.get(host[dot:])
                if table and (rule := self._by_port(table, port)):
                    return rule
                dot = host.find(".", dot + 1)
        return None

    def match_ip(self, address: str, port: int) -> str | None:
        if not self._nets:
            return None
        ip = ipaddress.ip_address(address)
        for net, net_port, text in self._nets:
            if ip.version == net.version and ip in net and (net_port is None or net_port == port):
                return text
        return None
