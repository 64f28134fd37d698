"""The client gate: may this peer talk to the proxy at all? Decided at accept, before a byte
is parsed, and again once a load balancer's PROXY header has said who the client is.

``admit`` and ``after_proxy_header`` are pure: they return an ``Admission`` (and the
client's address); ``Gate.refused`` counts a refusal, keeps a per-source summary for the
admin status (``refused_sources``: bounded) and logs it: at most one line per source per
``REJECTED_LOG_EVERY`` seconds, with the count of refusals not logged since, and at most
``REJECTED_LOG_BURST`` lines per such period in all, so a flood of refused peers cannot flood
the log. The connection acts on the verdict.
"""

from __future__ import annotations

import enum
import ipaddress
import time
from collections import OrderedDict

from ..errors import GatewayError
from ..http1 import proxy_protocol
from ..observe.accesslog import log_event
from ..observe.metrics import Metrics
from .runtime import Runtime

PROXY_HEADER_MAX = 600  # bytes collected before a PROXY header must have ended (v1: 107, v2: 16 + TLVs)
REJECTED_LOG_EVERY = 10.0  # seconds between two log lines about one source
REJECTED_LOG_BURST = 100  # log lines about refused sources per REJECTED_LOG_EVERY, all sources together
REFUSED_SOURCES = 1000  # sources remembered (the least recently refused are forgotten first)
LOGGED_VERDICTS = frozenset({"source_not_allowed", "untrusted_proxy"})


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


class _Source:
    __slots__ = ("count", "last_seen", "reason", "logged_at", "unlogged")

    def __init__(self) -> None:
        self.count = 0
        self.last_seen = 0.0  # wall clock, for people
        self.reason = ""
        self.logged_at = float("-inf")  # monotonic
        self.unlogged = 0  # refusals since the last log line about this source


class Gate:
    """Counts, summarises and logs refused connections."""

    def __init__(self, metrics: Metrics, clock, wall=time.time) -> None:
        self._metrics = metrics
        self._clock = clock
        self._wall = wall
        self._sources: OrderedDict[str, _Source] = OrderedDict()  # least recently refused first
        self._window = float("-inf")  # start of the current log budget period
        self._budget = REJECTED_LOG_BURST

    def refused(self, verdict: Admission, addr: str) -> None:
        self._metrics.rejected_connections.labels(verdict.value).inc()
        if addr == "-":
            return
        src = self._sources.get(addr)
        if src is None:
            src = self._sources[addr] = _Source()
            if len(self._sources) > REFUSED_SOURCES:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(addr)
        src.count += 1
        src.last_seen = self._wall()
        src.reason = verdict.value
        if verdict.value not in LOGGED_VERDICTS:
            return
        src.unlogged += 1
        now = self._clock()
        if now - src.logged_at < REJECTED_LOG_EVERY:
            return
        if now - self._window >= REJECTED_LOG_EVERY:
            self._window, self._budget = now, REJECTED_LOG_BURST
        if self._budget <= 0:
            return
        self._budget -= 1
        log_event("connection_rejected", client_addr=addr, reason=verdict.value, count=src.unlogged,
                  suppressed=src.unlogged - 1, total=src.count)
        src.logged_at = now
        src.unlogged = 0

    def refused_sources(self, limit: int = 100) -> list[dict]:
        """The most recently refused sources, newest first: address, refusals since start (or
        since the source was last forgotten), when last seen, and why."""
        out = []
        for addr in reversed(self._sources):
            if len(out) >= limit:
                break
            src = self._sources[addr]
            out.append({"client_addr": addr, "count": src.count, "last_seen": round(src.last_seen, 3),
                        "reason": src.reason})
        return out

    @property
    def refused_source_count(self) -> int:
        return len(self._sources)


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
