"""``egressgate explain``: what the gateway would decide for one client and destination, with
the rule, the profile, the resolved addresses and how the address guard classifies each —
without connecting to the destination. For reviewing a rule change before a reload."""

from __future__ import annotations

import asyncio
import ipaddress
from urllib.parse import urlsplit

from ..egress.resolver import Resolver
from ..errors import GatewayError
from ..model import HostPort
from ..policy.decide import decide
from ..policy.guard import OwnListeners
from ..policy.judge import judge
from ..proxy.runtime import Runtime


def parse_target(text: str) -> tuple[HostPort, bool, str]:
    """(destination, is CONNECT, method shown) from a URL, HOST:PORT, or socks5://HOST:PORT
    (method ``SOCKS5``: decided under ``security.socks_ports``)."""
    if text.startswith("socks5://"):
        parts = urlsplit(text)
        if not parts.hostname or not parts.port:
            raise ValueError(f"expected socks5://HOST:PORT, got {text!r}")
        host = parts.hostname
        return (HostPort.parse_authority(f"[{host}]:{parts.port}" if ":" in host else f"{host}:{parts.port}"),
                True, "SOCKS5")
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http://, https:// or socks5:// URL, got {text!r}")
        default = 443 if parts.scheme == "https" else 80
        host = parts.hostname
        authority = f"[{host}]:{parts.port or default}" if ":" in host else f"{host}:{parts.port or default}"
        connect = parts.scheme == "https"
        return HostPort.parse_authority(authority), connect, "CONNECT" if connect else "GET"
    return HostPort.parse_authority(text), True, "CONNECT"


def explain(rt: Runtime, client_name: str, target: str, source: str | None = None,
            resolver: Resolver | None = None, profile: str | None = None) -> tuple[bool, list[str]]:
    """(would it be forwarded, the lines to print). ``resolver`` looks names up (only needed
    when the target is a name); ``profile`` is the one the client asks for (``USER+PROFILE``)."""
    client = rt.clients.by_name.get(client_name)
    shown = client_name
    if client is None and "/" in client_name:  # a Kubernetes service account: the first entry listing it
        client = next((c for c in rt.clients.clients if c.token is not None and c.token.admits_name(client_name)),
                      None)
        if client is not None:
            shown = (f"{client_name} (kubernetes service account, entry {client.name}, "
                     f"issuer {client.token.issuer}, audiences {', '.join(client.token.audiences)})")
    if client is None:
        raise ValueError(f"no client named {client_name!r} (clients: {', '.join(rt.clients.by_name)}; "
                         "or a namespace/serviceaccount a kubernetes entry lists)")
    lines = [f"client:      {shown}" + (" (report mode)" if client.report_only else "")]
    ok = True
    if source is not None:
        ip = ipaddress.ip_address(source)
        admitted = client.admits_address(ip)
        first = next((c.name for c in rt.clients.candidates(source)), None)
        lines.append(f"from:        {source}: " + ("admitted by this client's 'from'" if admitted else
                                                   "NOT in this client's 'from' — the connection would be refused"))
        if admitted and first != client.name:
            lines.append(f"             note: client {first!r} comes first in the list and would match instead")
        ok = ok and admitted
    try:
        dest, connect, method = parse_target(target)
    except (GatewayError, ValueError) as exc:
        detail = exc.detail if isinstance(exc, GatewayError) else str(exc)
        return False, [*lines, f"target:      {target}: refused before policy (400): {detail}"]
    lines.append(f"request:     {method} {dest}")
    listener_default = rt.config.listen[0].egress if rt.config.listen else "default"
    if profile is not None:
        lines.append(f"asks for:    profile {profile}" + (f" (as {client.username}+{profile})" if client.username else "")
                     + (f" (as {client.token.username}+{profile})" if client.token else ""))
    socks = method == "SOCKS5"
    decision = decide(client, dest, connect, profile, listener_default, rt.socks_ports if socks else rt.connect_ports,
                      socks)
    if connect:
        lines.append(f"port rule:   {'security.socks_ports' if socks else 'security.connect_ports'}: "
                     f"{', '.join(map(str, sorted(rt.socks_ports if socks else rt.connect_ports)))}")
    verdict = "ALLOW" if decision.allow else "DENY"
    if decision.report_only:
        verdict = "ALLOW (report mode: would be denied)"
    lines.append(f"decision:    {verdict}: {decision.reason}" + (f" (rule: {decision.rule})" if decision.rule else ""))
    ok = ok and decision.allow
    pool = rt.profiles.get(decision.profile)
    if pool is not None:
        members = ", ".join(m.label for m in pool.members) + (
            f"; standby {', '.join(m.label for m in pool.standby)}" if pool.standby else "")
        lines.append(f"profile:     {pool.name} ({pool.kind}: {members})"
                     + (f", expect_ip {', '.join(pool.expect_ip)}" if pool.expect_ip else ""))
        rule = rt.protect[pool.name].match(dest) if pool.name in rt.protect else None
        if rule is not None:  # shared-IP protection (proxy.protect): the limits this request counts against
            limits = [f"{k} {v:g}" for k, v in (("max_concurrent", rule.max_concurrent),
                                                ("max_per_second", rule.max_per_second)) if v is not None]
            limits.append(f"Retry-After holds up to {rule.max_hold:g}s" if rule.max_hold else "no holds")
            lines.append(f"protect:     {rule.name} per egress member, all clients: {', '.join(limits)}")
    why = rt.names.check(dest.host) if decision.allow and pool is not None and not dest.is_ip and (
        pool.kind == "upstream" or rt.names.everywhere) else None
    if why is not None:  # (as proxy.route refuses it)
        lines.append(f"result:      403 destination_name_prohibited: {dest.host} is {why}")
        ok = False
    elif decision.allow and pool is not None and pool.kind == "upstream":
        lines.append("addresses:   resolved by the upstream proxy")
    elif decision.allow:
        addresses = [dest.host] if dest.is_ip else None
        if addresses is None:
            try:
                addresses = asyncio.run((resolver or Resolver()).resolve(dest.host))
            except GatewayError as exc:
                lines.append(f"addresses:   {exc.detail} -> 502 {exc.proxy_status}")
                return False, lines
        judgement = judge(dest, addresses, client, rt.guard, OwnListeners())
        for v in judgement.verdicts:
            lines.append(f"address:     {v.address}  {v.label}")
        if judgement.refusal is not None:
            err = judgement.refusal
            lines.append(f"result:      {err.status} {err.reason}: {err.detail}")
            ok = False
        elif judgement.would_deny:
            lines.append(f"addresses:   report mode: would be denied ({judgement.would_deny})")
    lines.append(f"result:      {'would be forwarded' if ok else 'would be refused'}")
    return ok, lines
