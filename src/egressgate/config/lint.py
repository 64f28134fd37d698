"""Warnings about valid but dangerous or useless configs (``check-config`` prints them; with
``--strict`` they fail the check). Pure: a ``Config`` (and the document as written, for what
validation normalises away) in, ``Finding`` values out; the caller renders ``FILE:LINE``.

Each rule is a function returning findings; ``RULES`` lists those that read the config,
``host_bits`` reads the document as written (``10.0.0.1/8`` is stored as ``10.0.0.0/8``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from .repair import Loc
from .schema import Config


@dataclass(frozen=True, slots=True)
class Finding:
    loc: Loc
    message: str


def lint(config: Config, raw: dict[str, Any] | None = None,
         local_addresses: Collection[str] | None = None) -> list[Finding]:
    """Every warning. ``raw``: the YAML document as written (for ``host_bits``);
    ``local_addresses``: this host's addresses (None: not on the serving host, e.g. ``--offline``,
    so ``bind`` addresses are not checked)."""
    found = [f for rule in RULES for f in rule(config)]
    if raw is not None:
        found += host_bits(raw)
    if local_addresses is not None:
        found += bind_not_local(config, local_addresses)
    return found


def _everything(network: str) -> bool:
    return ipaddress.ip_network(network).prefixlen == 0


def open_clients(config: Config) -> list[Finding]:
    """A client admitted from anywhere with no credentials: an open proxy."""
    found = []
    for i, client in enumerate(config.clients):
        if client.username or client.cert_subject or client.kubernetes:
            continue
        for j, net in enumerate(client.from_ or []):
            if _everything(net):
                found.append(Finding(("clients", i, "from", j),
                                     f"admits every address ({net}) without credentials: an open proxy for "
                                     "anyone who reaches the listener; add username and a password"))
    return found


def exposed_admin(config: Config) -> list[Finding]:
    """The admin listener reachable from other hosts while POST /-/reload needs no token."""
    address = config.admin.address
    if address is None or config.admin.token or config.admin.token_env or config.admin.token_file:
        return []
    host = address.rpartition(":")[0].strip("[]")
    if ipaddress.ip_address(host).is_loopback:
        return []
    return [Finding(("admin", "address"),
                    f"{address} is not loopback and no token (token, token_env or token_file) is set: anyone who reaches it "
                    "can POST /-/reload")]


def private_everything(config: Config) -> list[Finding]:
    """allow_private covering every address turns the private/metadata guard off."""
    return [Finding(("security", "allow_private", j),
                    f"{net} exempts every address from the private/loopback/metadata block: clients can reach "
                    "internal services and the cloud metadata server")
            for j, net in enumerate(config.security.allow_private) if _everything(net)]


def never_matching_clients(config: Config) -> list[Finding]:
    """Client entries no connection can match (earlier entries that shadow a later one are an
    error in the loader, not a warning)."""
    found = []
    mtls = any(listener.tls and listener.tls.client_ca for listener in config.listen)
    for i, client in enumerate(config.clients):
        if client.from_ is not None and not client.from_:
            found.append(Finding(("clients", i, "from"), "empty: no source address is admitted, the entry never "
                                                         "matches"))
        elif client.cert_subject and not client.username and not mtls:
            found.append(Finding(("clients", i, "cert_subject"),
                                 "no listener asks for client certificates (tls.client_ca), so this entry "
                                 "never matches"))
    return found


def weak_token_keys(config: Config) -> list[Finding]:
    """Kubernetes token keys that anyone on the path could replace, or fetches with no rate limit."""
    found = []
    for i, client in enumerate(config.clients):
        k8s = client.kubernetes
        if k8s is None:
            continue
        if not k8s.jwks_file:
            url, key = (k8s.jwks_url, "jwks_url") if k8s.jwks_url else (k8s.issuer, "issuer")
            if url.startswith("http://"):
                found.append(Finding(("clients", i, "kubernetes", key),
                                     "the signing keys would be fetched over plain http: anyone on the path could "
                                     "substitute their own and mint accepted tokens; use https or jwks_file"))
            if k8s.min_refresh < 1:
                found.append(Finding(("clients", i, "kubernetes", "min_refresh"),
                                     "below 1s: every token naming an unknown key makes the gateway fetch the "
                                     "issuer's keys again"))
    return found


def bind_not_local(config: Config, local_addresses: Collection[str]) -> list[Finding]:
    """``bind`` sources (and a bind profile's ``standby`` ones) this host does not have:
    connecting (or checking) from them fails."""
    mine = {ipaddress.ip_address(a) for a in local_addresses}
    loopback = ipaddress.ip_network("127.0.0.0/8")  # bindable as a whole on Linux
    found = []
    for name, profile in config.egress.items():
        entries = [("bind", j, e) for j, e in enumerate(profile.bind or [])]
        if profile.bind is not None:
            entries += [("standby", j, e) for j, e in enumerate(profile.standby) if "://" not in e]
        for key, j, entry in entries:
            what = "the profile cannot connect here" if key == "bind" else "the standby cannot be checked here"
            if "/" in entry:
                net = ipaddress.ip_network(entry)
                if not any(a in net for a in mine if a.version == net.version) and not (
                        net.version == 4 and net.subnet_of(loopback)):
                    found.append(Finding(("egress", name, key, j), f"this host has no address in {entry}: {what}"))
            else:
                ip = ipaddress.ip_address(entry)
                if ip not in mine and ip not in loopback:
                    found.append(Finding(("egress", name, key, j), f"{entry} is not an address of this host: {what}"))
    return found


def protect_per_instance(config: Config) -> list[Finding]:
    """Shared-IP limits and Retry-After holds are exact across one instance's workers (worker 0
    owns them), but without a fleet store (``fleet.redis``) each instance keeps its own: a
    deployment that can run several instances behind one egress IP (an autoscaled group, a
    Deployment with replicas, a rollout's surge) meets every figure once per instance. The
    number of workers does not matter; a fleet store silences it."""
    if config.fleet.redis is not None:
        return []
    return [Finding(("egress", name, "protect"),
                    "limits and holds are counted per instance (exact across its workers): with several "
                    "instances behind one egress IP the provider sees each figure once per instance; "
                    "set fleet.redis to share them (docs/operations.md#fleet-store-redis)")
            for name, profile in config.egress.items()
            if any(r.max_concurrent is not None or r.max_per_second is not None or r.max_hold > 0
                   for r in profile.protect)]


def readiness_evicts_every_replica(config: Config) -> list[Finding]:
    """``probe.readiness: all`` makes one profile's wrong or unverified egress IP take the
    instance out of the load balancer; every replica shares the egress IPs, so every instance
    goes at once (a shared, external condition must refuse per profile, never evict)."""
    attested = [name for name, p in config.egress.items() if p.expect_ip]
    if config.probe.readiness != "all" or not config.probe.required or len(attested) < 2:
        return []
    return [Finding(("probe", "readiness"),
                    f"readiness: all takes every replica out of the load balancer at once when one profile's "
                    f"egress IP fails its check (the replicas share the IPs), so {', '.join(attested)} all go dark "
                    f"with it; use any (the default): the profile alone refuses its traffic")]


def socks_without_clients(config: Config) -> list[Finding]:
    """A SOCKS5 listener no client entry can use: entries identified by a TLS client
    certificate (``cert_subject``) never match a SOCKS5 connection."""
    if any(c.username or not c.cert_subject for c in config.clients):
        return []
    return [Finding(("listen", i, "protocol"), "no client entry can use this socks5 listener: entries with "
                    "cert_subject never match SOCKS5; add one with username/password or source CIDRs alone")
            for i, listener in enumerate(config.listen) if listener.protocol == "socks5"]


RULES: tuple[Callable[[Config], list[Finding]], ...] = (
    open_clients, exposed_admin, private_everything, never_matching_clients, protect_per_instance,
    socks_without_clients, weak_token_keys, readiness_evicts_every_replica)

# Where the document holds CIDRs whose host bits validation would silently clear.
_CIDR_LISTS: tuple[tuple[str, ...], ...] = (
    ("clients", "*", "from"), ("listen", "*", "trusted_proxies"), ("security", "allow_private"))


def host_bits(raw: dict[str, Any]) -> list[Finding]:
    """``10.0.0.1/8`` means ``10.0.0.0/8``: probably not what was meant."""
    found = []
    for pattern in _CIDR_LISTS:
        for loc, value in _walk(raw, pattern, ()):
            for j, text in enumerate(value if isinstance(value, list) else []):
                meant = _host_bits_cleared(str(text))
                if meant is not None:
                    found.append(Finding((*loc, j), f"{text} has host bits set; it means {meant}"))
    return found


def _host_bits_cleared(text: str) -> str | None:
    """The network ``text`` stands for when it has host bits set, else None (also for non-CIDRs,
    which validation reports)."""
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    try:
        ipaddress.ip_network(text)
    except ValueError:
        return str(net)
    return None


def _walk(node: Any, pattern: tuple[str, ...], loc: Loc) -> list[tuple[Loc, Any]]:
    if not pattern:
        return [(loc, node)]
    head, rest = pattern[0], pattern[1:]
    if head == "*":
        items = list(enumerate(node)) if isinstance(node, list) else []
    else:
        items = [(head, node[head])] if isinstance(node, dict) and head in node else []
    return [hit for key, child in items for hit in _walk(child, rest, (*loc, key))]
