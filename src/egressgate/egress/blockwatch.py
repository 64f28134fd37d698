"""Block-aware egress, the pure half (issue 30): signals from live traffic and the state per
(member x provider). No I/O, no clock of its own (callers pass ``now``), nothing logged: every
state change is returned as a ``Transition`` value for the caller to log, count and act on.

Signals (``Signal`` names), each observed at the end of one exchange or from one active check:

- ``ok``: a plain-HTTP answer outside the block/throttle classes, a tunnel that carried data;
- ``block_status``: 401, 403, 451 (``BLOCK_STATUSES``);
- ``throttle``: 429, or 503 with ``Retry-After`` (a hold: ``retry_after`` parses it);
- ``marker``: a provider's block-page / CAPTCHA marker in a header or the first KiB of the body
  (``Matcher.marker_in``; the caller hands over at most ``MARKER_WINDOW`` bytes it already has);
- ``early_close``: a tunnel the server reset or closed right after the client's first flight;
- ``tls_alert``: a TLS alert record before encryption (``tls_alert`` reads it from the server's
  first bytes);
- ``tiny_tunnel``: a tunnel that ended with almost no bytes back (< ``TINY_BYTES``);
- ``connect_fail``: connection refused or timed out;
- ``check_ok`` / ``check_fail`` / ``check_throttled``: the active checks' results.

States, in order: ``healthy`` -> ``throttled`` -> ``suspected`` -> ``blocked`` -> ``reverified``.
Counts run over a sliding window (``Thresholds.window`` seconds). ``throttled``: at least
``throttle_after`` throttle signals; ``suspected``: at least ``suspect_after`` block signals;
``blocked``: at least ``block_after`` block signals making at least ``block_ratio`` of the
window's traffic. ``blocked`` is left only by a passing active check (``reverified``, which
clears the window), never by live traffic alone; ``reverified`` becomes ``healthy`` on the next
signal when the window holds no block signal.
The cost per signal is O(1) amortised (one deque append, expired entries popped).

Compiled config: ``ProviderWatch`` is one provider's ``match`` patterns (a ``policy.rules.RuleSet``,
as clients' ``allow``), markers (statuses, header and first-KiB body regexes), thresholds and
``on_block``; ``BlockRules.lookup(profile, dest)`` finds the provider a destination belongs to;
``compile_rules`` is None when no provider names ``match`` (nothing is watched, nothing paid).
``header_value`` / ``header_line`` render the ``Egress-Block-State`` field.
"""

from __future__ import annotations

import fnmatch
import re
from collections import deque
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from ..model import HostPort
from ..policy.rules import RuleSet

STATES = ("healthy", "throttled", "suspected", "blocked", "reverified")
BLOCK_STATUSES = frozenset({401, 403, 451})
BLOCK_SIGNALS = frozenset({"block_status", "marker", "early_close", "tls_alert", "tiny_tunnel",
                           "connect_fail", "check_fail"})
THROTTLE_SIGNALS = frozenset({"throttle", "check_throttled"})
MARKER_WINDOW = 1024
TINY_BYTES = 64
HEADER = "Egress-Block-State"  # on the CONNECT 200 and plain-HTTP responses (``header_line``)


@dataclass(frozen=True, slots=True)
class Thresholds:
    window: float = 300.0
    throttle_after: int = 3
    suspect_after: int = 3
    block_after: int = 10
    block_ratio: float = 0.5


@dataclass(frozen=True, slots=True)
class Transition:
    member: str
    provider: str
    before: str
    after: str
    at: float
    evidence: str


class Matcher:
    """A provider's destinations (``match:`` host patterns) and markers, compiled once."""

    def __init__(self, provider: str, patterns: tuple[str, ...], markers: tuple[str, ...] = ()) -> None:
        self.provider = provider
        self.exact = frozenset(p.lower() for p in patterns if not any(c in p for c in "*?["))
        self.suffixes = tuple(p[1:].lower() for p in patterns if p.startswith("*.") and not any(c in p[2:] for c in "*?["))
        self.globs = tuple(p.lower() for p in patterns
                           if any(c in p for c in "*?[") and p[1:].lower() not in self.suffixes)
        self.markers = tuple(m.lower().encode() for m in markers)

    def matches(self, host: str) -> bool:
        h = host.lower().rstrip(".")
        return h in self.exact or h.endswith(self.suffixes) or any(fnmatch.fnmatchcase(h, g) for g in self.globs)

    def marker_in(self, head: bytes) -> str | None:
        """The first marker found in ``head`` (the caller's response head plus at most
        ``MARKER_WINDOW`` body bytes it already holds), or None."""
        low = head[: MARKER_WINDOW * 8].lower()
        for m in self.markers:
            if m in low:
                return m.decode()
        return None


def classify_http(status: int, retry_after_present: bool, marker: str | None) -> str:
    """The signal of one plain-HTTP answer."""
    if marker is not None:
        return "marker"
    if status in BLOCK_STATUSES:
        return "block_status"
    if status == 429 or (status == 503 and retry_after_present):
        return "throttle"
    return "ok"


def classify_tunnel(*, bytes_up: int, bytes_down: int, reset: bool, closed_after_first_flight: bool,
                    alert: tuple[int, int] | None) -> str:
    """The signal of one ended tunnel."""
    if alert is not None:
        return "tls_alert"
    if (reset or closed_after_first_flight) and bytes_up > 0 and bytes_down < TINY_BYTES:
        return "early_close"
    if bytes_up > 0 and bytes_down < TINY_BYTES:
        return "tiny_tunnel"
    return "ok"


def tls_alert(first: bytes) -> tuple[int, int] | None:
    """(level, description) when the server's first bytes are a TLS alert record, else None."""
    if len(first) >= 7 and first[0] == 0x15 and first[1] == 0x03 and int.from_bytes(first[3:5], "big") == 2:
        return first[5], first[6]
    return None


def retry_after(value: str, now: float) -> float | None:
    """The absolute time a ``Retry-After`` value holds until, or None when unreadable."""
    v = value.strip()
    if v.isdigit():
        return now + min(int(v), 86400)
    try:
        return parsedate_to_datetime(v).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


class _Pair:
    __slots__ = ("state", "events", "blocks", "throttles", "hold_until", "last")

    def __init__(self) -> None:
        self.state = "healthy"
        self.events: deque[tuple[float, str]] = deque()
        self.blocks = 0
        self.throttles = 0
        self.hold_until = 0.0
        self.last = ""


class BlockWatch:
    """The state of every (member x provider) seen, fed one signal at a time."""

    def __init__(self, thresholds: Thresholds = Thresholds(), cap: int = 4096) -> None:
        self.t = thresholds
        self.cap = cap  # bound on events kept per pair
        self.pairs: dict[tuple[str, str], _Pair] = {}

    def state(self, member: str, provider: str) -> str:
        p = self.pairs.get((member, provider))
        return p.state if p else "healthy"

    def held(self, member: str, provider: str, now: float) -> bool:
        p = self.pairs.get((member, provider))
        return bool(p and p.hold_until > now)

    def hold(self, member: str, provider: str, until: float) -> None:
        p = self.pairs.setdefault((member, provider), _Pair())
        p.hold_until = max(p.hold_until, until)

    def observe(self, member: str, provider: str, signal: str, now: float, evidence: str = "",
                thresholds: Thresholds | None = None) -> Transition | None:
        """Count one signal (``thresholds``: the provider's own, else the watch's default)."""
        t = thresholds or self.t
        p = self.pairs.get((member, provider))
        if p is None:
            p = self.pairs[(member, provider)] = _Pair()
        ev = p.events
        ev.append((now, signal))
        p.blocks += signal in BLOCK_SIGNALS
        p.throttles += signal in THROTTLE_SIGNALS
        if evidence and signal != "ok":
            p.last = evidence
        horizon = now - t.window
        while ev and (ev[0][0] < horizon or len(ev) > self.cap):
            _, old = ev.popleft()
            p.blocks -= old in BLOCK_SIGNALS
            p.throttles -= old in THROTTLE_SIGNALS
        if not p.blocks and not p.throttles and p.state == "healthy":
            return None  # (the common case: nothing to move)
        after = self._next(p, signal, t)
        if after == p.state:
            return None
        before, p.state = p.state, after
        if after == "reverified":  # the passing check wipes the slate: old evidence is not re-counted
            ev.clear()
            p.blocks = p.throttles = 0
        return Transition(member, provider, before, after, now, p.last)

    def _next(self, p: _Pair, signal: str, t: Thresholds) -> str:
        s = p.state
        if signal == "check_ok" and s in ("blocked", "suspected"):
            return "reverified"
        if s == "blocked":
            return s
        if p.blocks >= t.block_after and p.blocks >= t.block_ratio * len(p.events):
            return "blocked"
        if p.blocks >= t.suspect_after:
            return "suspected"
        if s == "reverified":
            return "healthy" if p.blocks == 0 else s
        if p.throttles >= t.throttle_after:
            return "throttled"
        return "healthy"

    def force(self, member: str, provider: str, state: str, now: float, evidence: str = "") -> Transition | None:
        """Take a state another worker found (``blocked`` or ``reverified``; anything else is
        ignored): as if its signals had been seen here."""
        if state not in ("blocked", "reverified"):
            return None
        p = self.pairs.setdefault((member, provider), _Pair())
        if p.state == state:
            return None
        before, p.state = p.state, state
        if evidence:
            p.last = evidence
        if state == "reverified":
            p.events.clear()
            p.blocks = p.throttles = 0
        return Transition(member, provider, before, state, now, p.last)

    def counts(self, member: str, provider: str) -> dict[str, int]:
        """The signals in the pair's window, by name (for ``/status``)."""
        p = self.pairs.get((member, provider))
        out: dict[str, int] = {}
        for _, signal in p.events if p else ():
            out[signal] = out.get(signal, 0) + 1
        return out

    def evidence(self, member: str, provider: str) -> str:
        p = self.pairs.get((member, provider))
        return p.last if p else ""

    def hold_until(self, member: str, provider: str) -> float:
        p = self.pairs.get((member, provider))
        return p.hold_until if p else 0.0

    def keep_only(self, pairs: set[tuple[str, str]]) -> None:
        """After a reload: forget the pairs no profile watches any more (the table stays bounded)."""
        for key in [k for k in self.pairs if k not in pairs]:
            del self.pairs[key]


def header_value(state: str, provider: str, member: str, extra: str = "") -> str:
    """``blocked; provider=vendor-x; member=203.0.113.10`` (the ``Egress-Block-State`` value)."""
    return f"{state}; provider={provider}; member={member}{extra}"


def header_line(state: str, provider: str, member: str, extra: str = "") -> bytes:
    """The whole ``Egress-Block-State`` header line, CRLF-terminated."""
    return f"{HEADER}: {header_value(state, provider, member, extra)}\r\n".encode("latin-1", "replace")


@dataclass(frozen=True, slots=True)
class ProviderWatch:
    """One provider of one profile as live traffic is judged against it (compiled from a
    ``ProviderConfig`` with ``match``)."""

    profile: str
    name: str
    rules: RuleSet
    statuses: frozenset[int]
    body: tuple[re.Pattern[bytes], ...]
    headers: tuple[tuple[bytes, re.Pattern[bytes]], ...]  # (lower-case name, regex over its value)
    thresholds: Thresholds
    reroute: bool

    @classmethod
    def compile(cls, profile: str, spec: object) -> ProviderWatch:
        m, t = spec.markers, spec.thresholds
        headers = []
        for item in m.header:
            name, _, pattern = item.partition(":")
            headers.append((name.strip().lower().encode("latin-1"), re.compile(pattern.strip().encode(), re.I)))
        return cls(profile, spec.name, RuleSet(spec.match), frozenset(m.status),
                   tuple(re.compile(b.encode(), re.I) for b in m.body), tuple(headers),
                   Thresholds(t.window, t.throttle_after, t.suspect_after, t.block_after, t.block_ratio),
                   spec.on_block == "reroute")

    @property
    def peeks(self) -> bool:
        """Whether the first KiB of a plain-HTTP body is worth keeping (body markers configured)."""
        return bool(self.body)

    def header_marker(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        for name, value in headers:
            low = name.lower()
            for want, pattern in self.headers:
                if low == want and pattern.search(value):
                    return f"header {name.decode('latin-1')}: {value[:80].decode('latin-1')}"
        return None

    def body_marker(self, first: bytes) -> str | None:
        for pattern in self.body:
            found = pattern.search(first, 0, MARKER_WINDOW)
            if found:
                return f"body matches {pattern.pattern.decode('utf-8', 'replace')!r} ({found.group(0)[:60]!r})"
        return None

    def classify(self, status: int, retry_after_present: bool, marker: str | None) -> str:
        """``classify_http`` with this provider's block statuses."""
        if marker is not None:
            return "marker"
        if status in self.statuses:
            return "block_status"
        if status == 429 or (status == 503 and retry_after_present):
            return "throttle"
        return "ok"


class BlockRules:
    """Every watched provider of a runtime, by profile: ``lookup`` finds the provider a
    destination belongs to. Compiled once per config; ``compile_rules`` returns None when no
    provider names ``match`` (an unconfigured gateway pays one ``is None`` per request)."""

    __slots__ = ("by_profile", "names")

    def __init__(self, by_profile: dict[str, tuple[ProviderWatch, ...]]) -> None:
        self.by_profile = by_profile
        self.names = {(w.profile, w.name): w for ws in by_profile.values() for w in ws}

    def lookup(self, profile: str, dest: HostPort) -> ProviderWatch | None:
        for w in self.by_profile.get(profile, ()):
            if w.rules.match_rule(dest.host, dest.port, dest.is_ip) is not None:
                return w
        return None

    def get(self, profile: str, provider: str) -> ProviderWatch | None:
        return self.names.get((profile, provider))


def compile_rules(egress: dict) -> BlockRules | None:
    """``egress``: the config's profiles (name -> ``ProfileConfig``)."""
    by_profile = {name: tuple(ProviderWatch.compile(name, p) for p in spec.providers if p.match)
                  for name, spec in egress.items()}
    by_profile = {name: ws for name, ws in by_profile.items() if ws}
    return BlockRules(by_profile) if by_profile else None
