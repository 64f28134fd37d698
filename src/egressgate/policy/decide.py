"""``decide``: may this client go to this destination, and through which egress profile?

Pure: a function of its arguments, returning a ``Decision`` with a reason string and the
rule that decided. The caller logs and counts it once. Address safety of the *resolved*
addresses is separate (``guard``); this looks only at what the client asked for.
"""

from __future__ import annotations

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
           listener_default: str, connect_ports: frozenset[int]) -> Decision:
    profile = choose_profile(client, requested_profile, listener_default)
    if profile is None:
        return Decision(False, "profile_not_allowed", f"profiles: {', '.join(client.profiles or (listener_default,))}",
                        requested_profile or "")
    denial = _denial(client, dest, connect, connect_ports)
    if denial is None:
        rule = ""
        if client.allow is not None:
            rule = client.allow.match(dest.host, dest.port, dest.is_ip) or ""
        return Decision(True, "allowed", rule, profile)
    reason, rule = denial
    if client.report_only:
        return Decision(True, reason, rule, profile, report_only=True)
    return Decision(False, reason, rule, profile)


def _denial(client: ClientPolicy, dest: HostPort, connect: bool,
            connect_ports: frozenset[int]) -> tuple[str, str] | None:
    host, port = dest.host, dest.port
    is_ip = dest.is_ip
    if not is_ip and host in METADATA_NAMES:
        return "destination_ip_prohibited", "metadata host name"
    if client.deny is not None and not client.deny.empty:
        rule = client.deny.match(host, port, is_ip)
        if rule:
            return "destination_denied", rule
    if client.allow is not None:
        rule = client.allow.match(host, port, is_ip)
        if rule is None:
            return "destination_not_allowed", "allow"
        if connect and port not in connect_ports and port not in client.allow.ports:
            return "connect_port_not_allowed", f"connect_ports: {sorted(connect_ports)}"
        return None
    if connect and port not in connect_ports:
        return "connect_port_not_allowed", f"connect_ports: {sorted(connect_ports)}"
    return None
