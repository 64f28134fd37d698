"""``decide``: may this client go to this destination, and through which egress profile?

Pure: a function of its arguments, returning a ``Decision`` with a reason string and the
rule that decided. The caller logs and counts it once. Address safety of the *resolved*
addresses is separate (``guard``); this looks only at what the client asked for.
"""

from __future__ import annotations

import functools

from ..model import Decision, HostPort
from .clients import ClientPolicy
from .guard import METADATA_NAMES


def choose_profile(client: ClientPolicy, requested: str | None, listener_default: str) -> str | None:
    """The profile to use, or None when the client may not use the one it asked for."""
    allowed = client.profiles or (listener_default,)
    if requested is None:
        return allowed[0]
    return requested if requested in allowed else None


def decide(client: ClientPolicy, dest: HostPort, connect: bool, requested_profile: str | None,
           listener_default: str, connect_ports: frozenset[int], socks: bool = False) -> Decision:
    """``connect_ports``: the ports a tunnel may reach -- ``security.connect_ports`` for HTTP
    CONNECT, ``security.socks_ports`` for SOCKS5 (``socks``), each refusal naming its own."""
    profile = choose_profile(client, requested_profile, listener_default)
    if profile is None:
        return Decision(False, "profile_not_allowed", f"profiles: {', '.join(client.profiles or (listener_default,))}",
                        requested_profile or "")
    host, port, is_ip = dest.host, dest.port, dest.is_ip
    # Safety checks first: report mode never relaxes these.
    if not is_ip and host in METADATA_NAMES:
        return Decision(False, "destination_ip_prohibited", "metadata host name", profile)
    allowed = client.allow.match_rule(host, port, is_ip) if client.allow is not None else None
    if connect and port not in connect_ports and not (allowed and allowed[1]):
        if socks:
            return Decision(False, "socks_port_not_allowed", f"socks_ports: {sorted(connect_ports)}", profile)
        return Decision(False, "connect_port_not_allowed", f"connect_ports: {sorted(connect_ports)}", profile)
    # The client's own rules: report mode logs these and lets the request through.
    denial = _rule_denial(client, dest, allowed)
    if denial is None:
        return _allowed(allowed[0] if allowed else "", profile)
    reason, rule = denial
    if client.report_only:
        return Decision(True, reason, rule, profile, report_only=True)
    return Decision(False, reason, rule, profile)


@functools.lru_cache(maxsize=4096)
def _allowed(rule: str, profile: str) -> Decision:
    return Decision(True, "allowed", rule, profile)  # immutable, so shared between requests


def _rule_denial(client: ClientPolicy, dest: HostPort, allowed: tuple[str, bool] | None) -> tuple[str, str] | None:
    if client.deny is not None and not client.deny.empty:
        rule = client.deny.match(dest.host, dest.port, dest.is_ip)
        if rule:
            return "destination_denied", rule
    if client.allow is not None and allowed is None:
        return "destination_not_allowed", "allow"
    return None
