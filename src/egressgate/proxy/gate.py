"""The client gate: may this peer talk to the proxy at all? Decided at accept, before a byte
is parsed, and again once a load balancer's PROXY header has said who the client is.

``admit`` and ``after_proxy_header`` are pure: they return an ``Admission`` (and the
client's address); ``Gate.refused`` counts and logs a refusal (one log line per 10 s at
most, so a flood of refused peers cannot flood the log). The connection acts on the verdict.
"""

from __future__ import annotations

import enum
import ipaddress

from ..errors import GatewayError
from ..http1 import proxy_protocol
from ..observe.accesslog import log_event
from ..observe.metrics import Metrics
from .runtime import Runtime

PROXY_HEADER_MAX = 600  # bytes collected before a PROXY header must have ended (v1: 107, v2: 16 + TLVs)
REJECTED_LOG_EVERY = 10.0


class Admission(enum.Enum):
    ADMIT = "admit"
    READ_PROXY_HEADER = "read_proxy_header"  # behind a load balancer: its header comes first
    PEER_GONE = "peer_gone"  # reset before we could ask who it was
    UNTRUSTED_PROXY = "untrusted_proxy"  # a PROXY listener reached by someone not the load balancer
    SOURCE_NOT_ALLOWED = "source_not_allowed"
    MAX_CONNECTIONS = "max_connections"
    PROXY_PROTOCOL = "proxy_protocol"  # no valid PROXY header


def admit(peername: object, listener: str, rt: Runtime, open_connections: int) -> tuple[Admission, str]:
    """(verdict, client address) for a new connection to ``listener``."""
    if not peername:
        return Admission.PEER_GONE, "-"
    addr = _unmapped(peername[0])
    trusted = rt.proxy_protocol.get(listener)
    if trusted is not None:
        if not in_networks(addr, trusted):
            return Admission.UNTRUSTED_PROXY, addr
    elif not rt.clients.admits(addr):
        return Admission.SOURCE_NOT_ALLOWED, addr
    if open_connections >= rt.limits.max_connections:
        return Admission.MAX_CONNECTIONS, addr
    return (Admission.READ_PROXY_HEADER if trusted is not None else Admission.ADMIT), addr


def after_proxy_header(buf: bytes, peer: str, rt: Runtime) -> tuple[Admission | None, str, int]:
    """(verdict, client address, header length) once ``buf`` holds a PROXY header; verdict
    None while it is incomplete. A LOCAL header (the balancer's own check) keeps ``peer``."""
    try:
        found = proxy_protocol.parse(buf)
    except GatewayError:
        found = False
    if found is None and len(buf) <= PROXY_HEADER_MAX:
        return None, peer, 0
    if not found:
        return Admission.PROXY_PROTOCOL, peer, 0
    consumed, addr = found
    if addr is not None:
        peer = _unmapped(addr)
    if not rt.clients.admits(peer):
        return Admission.SOURCE_NOT_ALLOWED, peer, consumed
    return Admission.ADMIT, peer, consumed


class Gate:
    """Counts and logs refused connections."""

    def __init__(self, metrics: Metrics, clock) -> None:
        self._metrics = metrics
        self._clock = clock
        self._logged = float("-inf")

    def refused(self, verdict: Admission, addr: str) -> None:
        self._metrics.rejected_connections.labels(verdict.value).inc()
        if verdict in (Admission.SOURCE_NOT_ALLOWED, Admission.UNTRUSTED_PROXY):
            now = self._clock()
            if now - self._logged >= REJECTED_LOG_EVERY:
                self._logged = now
                log_event("connection_rejected", client_addr=addr, reason=verdict.value)


def subject_cn(cert: dict | None) -> str | None:
    """The common name of a verified TLS client certificate (mutual TLS identity)."""
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def in_networks(address: str, networks) -> bool:
    ip = ipaddress.ip_address(address)
    return any(ip.version == n.version and ip in n for n in networks)


def _unmapped(addr: str) -> str:
    return addr[7:] if addr.startswith("::ffff:") and "." in addr else addr
