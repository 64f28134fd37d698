"""Block-aware egress, the running half (issue 30): live traffic to a provider's destinations
feeds the state per (member x provider) kept by ``egress.blockwatch.BlockWatch``.

- ``BlockDesk`` (one per worker, kept across reloads): the states, their metric
  (``egressgate_egress_block_state``), an ``egress_block_state`` event on each change, the
  active checks' results (``checked``), rerouting (``steer``: ``on_block: reroute`` keeps new
  connections to that provider's destinations off a blocked member; with nowhere to go, 503),
  and the views ``/status`` and ``whoami`` show.
- ``Watch`` (one per request or tunnel to a watched destination, ``AccessRecord.watch``): which
  provider and member, what the answer looked like (status, Retry-After, markers in the headers
  or the first KiB of the body: ``_Sink``; the server's first bytes and who closed first:
  ``WatchedTunnel``), and, when the record is finished, the signal it makes.

Nothing of this exists for a destination no provider matches: a request pays one ``is None``
on the runtime's ``blocks`` and one on its record's ``watch`` (``rt.blocks`` is None when no
provider names ``match``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..egress.blockwatch import (
    HEADER,
    MARKER_WINDOW,
    STATES,
    BlockRules,
    BlockWatch,
    ProviderWatch,
    Transition,
    classify_tunnel,
    header_line,
    header_value,
    tls_alert,
)
from ..egress.plan import EgressPlan
from ..egress.providers import ProviderResult, parse_retry_after
from ..errors import EgressBlocked
from ..http1.parse import ResponseHead
from ..model import AccessRecord, shown_target
from ..observe.accesslog import log_event
from ..observe.metrics import Metrics
from .forward import Exchange
from .route import Route
from .tunnel import Tunnel

CONNECT_FAILURES = frozenset({"connection_refused", "connect_timeout"})  # a dial's reasons that are signals
TUNNEL_METHODS = frozenset({"CONNECT", "SOCKS5"})
# The active checks' outcomes that say something about the member (a DNS error, a bind address
# gone or an internal error are not the provider's verdict and move nothing).
CHECK_FAILS = frozenset({"http_status", "body_refused", "tls_error", "reset", "closed", "connect_refused",
                         "connect_timeout", "no_response"})
ALERTS = {0: "close_notify", 10: "unexpected_message", 20: "bad_record_mac", 40: "handshake_failure",
          42: "bad_certificate", 46: "certificate_unknown", 47: "illegal_parameter", 48: "unknown_ca",
          49: "access_denied", 50: "decode_error", 51: "decrypt_error", 70: "protocol_version",
          71: "insufficient_security", 80: "internal_error", 86: "inappropriate_fallback", 90: "user_canceled",
          109: "missing_extension", 112: "unrecognized_name", 116: "certificate_required",
          120: "no_application_protocol"}


class BlockDesk:
    """Every (member x provider) state of this worker. ``clock``: wall-clock seconds."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.time, log: bool = True) -> None:
        self.watch = BlockWatch()
        self.metrics = metrics
        self.clock = clock
        self.log = log
        self.rules: BlockRules | None = None
        # tell the other workers a blocked / reverified state (set by the app: fleet.Owner / Member;
        # with a fleet store, worker 0 passes it on to every other instance too)
        self.share: Callable[[dict], None] | None = None
        # (profile, member label) -> the public IP its egress-IP check saw, and back: another
        # instance's members have their own labels (their own source addresses) behind the same IP
        self.public_ip: Callable[[str, str], str | None] = lambda profile, member: None
        self.member_for: Callable[[str, str], str | None] = lambda profile, ip: None

    def adopt(self, rules: BlockRules | None, members: dict[str, list[str]]) -> None:
        """A runtime comes into force: its rules; the states of pairs it still watches are kept,
        the others forgotten; every watched pair is exported (``healthy`` until seen otherwise).
        ``members``: profile -> its members' labels."""
        self.rules = rules
        keep: set[tuple[str, str]] = set()
        self.metrics.egress_block_state.clear()
        for profile, watches in (rules.by_profile.items() if rules else ()):
            for w in watches:
                for member in members.get(profile, ()):
                    keep.add((member, w.name))
                    self._export(profile, member, w.name, self.watch.state(member, w.name))
        self.watch.keep_only(keep)

    def _export(self, profile: str, member: str, provider: str, state: str) -> None:
        for s in STATES:
            self.metrics.egress_block_state.labels(profile, member, provider, s).set(1 if s == state else 0)

    def state(self, member: str, provider: str) -> str:
        return self.watch.state(member, provider)

    def watched(self, profile: str) -> bool:
        """Whether a provider of ``profile`` names ``match``."""
        return self.rules is not None and profile in self.rules.by_profile

    # --- signals ------------------------------------------------------------------------------
    def observe(self, w: ProviderWatch, member: str, signal: str, evidence: str) -> Transition | None:
        now = self.clock()
        tr = self.watch.observe(member, w.name, signal, now, evidence, w.thresholds)
        if tr is not None:
            self._changed(w.profile, tr, signal)
        return tr

    def _changed(self, profile: str, tr: Transition, signal: str) -> None:
        self._export(profile, tr.member, tr.provider, tr.after)
        if self.share is not None and tr.after in ("blocked", "reverified"):
            self.share({"profile": profile, "member": tr.member, "provider": tr.provider, "state": tr.after,
                        "evidence": tr.evidence[:300], "egress_ip": self.public_ip(profile, tr.member)})
        if self.log:
            log_event("egress_block_state", profile=profile, member=tr.member, provider=tr.provider,
                      before=tr.before, after=tr.after, signal=signal, evidence=tr.evidence,
                      counts=self.watch.counts(tr.member, tr.provider))

    def shared(self, doc: dict) -> None:
        """A state another worker (or, with a fleet store, another instance) found (``blocked``
        or ``reverified``), taken as if seen here: routing and the header agree across the fleet.
        The member is the local one exiting from the same public IP, when both were attested,
        else the one with the same label. Logged by the finder only."""
        w = self.rules.get(str(doc.get("profile")), str(doc.get("provider"))) if self.rules is not None else None
        if w is None:
            return
        ip = doc.get("egress_ip")
        member = (self.member_for(w.profile, ip) if isinstance(ip, str) else None) or str(doc.get("member"))
        tr = self.watch.force(member, w.name, str(doc.get("state")), self.clock(),
                              str(doc.get("evidence", ""))[:300])
        if tr is not None:
            self._export(w.profile, tr.member, tr.provider, tr.after)

    def checked(self, r: ProviderResult) -> None:
        """An active check's result: ``accepted`` re-verifies a blocked or suspected member,
        ``throttled`` counts (and holds for its Retry-After), a refusal counts as a block."""
        w = self.rules.get(r.profile, r.provider) if self.rules is not None else None
        if w is None:
            return
        if r.ok:
            signal = "check_ok"
        elif r.outcome == "throttled":
            signal = "check_throttled"
            if r.retry_after:
                self.watch.hold(r.member, r.provider, r.at + r.retry_after)
        elif r.outcome in CHECK_FAILS:
            signal = "check_fail"
        else:
            return
        self.observe(w, r.member, signal, f"check: {r.outcome}: {r.detail}"[:300])

    # --- routing ------------------------------------------------------------------------------
    def begin(self, r: Route, w: ProviderWatch, rec: AccessRecord) -> None:
        """A request or tunnel to ``w``'s destinations: with ``on_block: reroute``, new
        connections avoid members ``blocked`` for this provider (raises ``EgressBlocked`` when
        every member is); then ``rec`` gets its ``Watch``."""
        plans = r.plans
        rerouted = None
        if w.reroute and plans:
            blocked = [p for p in plans if self.watch.state(p.label, w.name) == "blocked"]
            if blocked:
                usable = [p for p in plans if p not in blocked]
                if not usable:
                    m = blocked[0].label
                    raise EgressBlocked(
                        f"provider {w.name} blocks every member of profile {w.profile}: {m}"
                        f" ({self.watch.evidence(m, w.name) or 'blocked'})",
                        profile=w.profile, headers=((HEADER, header_value("blocked", w.name, m)),))
                # the healthiest first, in the pool's order among equals
                usable.sort(key=lambda p: _RANK[self.watch.state(p.label, w.name)])
                r.plans = usable
                rerouted = blocked[0].label
        rec.watch = Watch(self, w, r.plans[0].label if r.plans else "-", rerouted)

    # --- views --------------------------------------------------------------------------------
    def view(self, profile: str, members: list[str]) -> list[dict] | None:
        """``/status``: one row per (member x watched provider) of ``profile`` (None: none watched)."""
        watches = self.rules.by_profile.get(profile, ()) if self.rules is not None else ()
        if not watches:
            return None
        now = self.clock()
        rows = []
        for w in watches:
            for m in members:
                hold = self.watch.hold_until(m, w.name)
                rows.append({"provider": w.name, "member": m, "state": self.watch.state(m, w.name),
                             "on_block": "reroute" if w.reroute else "report",
                             "signals": self.watch.counts(m, w.name), "evidence": self.watch.evidence(m, w.name),
                             "held_for": round(hold - now, 1) if hold > now else None})
        return rows

    def not_healthy(self, profile: str, members: list[str]) -> list[dict]:
        """``whoami``: the (member x provider) pairs of ``profile`` that are not healthy."""
        return [row for row in self.view(profile, members) or () if row["state"] != "healthy"]


_RANK = {"healthy": 0, "reverified": 1, "throttled": 2, "suspected": 3, "blocked": 4}


class Watch:
    """One request or tunnel to a watched provider's destination (see the module docstring)."""

    __slots__ = ("desk", "w", "member", "rerouted", "status", "retry_after", "marker", "body", "first",
                 "server_first", "head_seen", "counted")

    def __init__(self, desk: BlockDesk, w: ProviderWatch, member: str, rerouted: str | None) -> None:
        self.desk = desk
        self.w = w
        self.member = member
        self.rerouted = rerouted  # the blocked member this connection was moved off
        self.status = 0
        self.retry_after: bytes | None = None
        self.marker: str | None = None
        self.body = b""  # the first MARKER_WINDOW bytes of a plain-HTTP body (body markers only)
        self.first: bytes | None = None  # a tunnel's first server bytes (at most 8)
        self.server_first = False  # a tunnel's server ended its side before the client did
        self.head_seen = False
        self.counted: tuple[str, str, Transition | None] | None = None  # (signal, evidence, change) once counted

    def chosen(self, plan: EgressPlan) -> None:
        """The member the connector really used (failover)."""
        self.member = plan.label

    def header(self) -> bytes | None:
        """The ``Egress-Block-State`` line for the member used, or None while it is healthy."""
        state = self.desk.watch.state(self.member, self.w.name)
        if state == "healthy" and self.rerouted is None:
            return None
        extra = ""
        if self.rerouted is not None:
            extra = f"; rerouted_from={self.rerouted}"
        hold = self.desk.watch.hold_until(self.member, self.w.name) - self.desk.clock()
        if hold > 0:
            extra += f"; retry_after={int(hold) + 1}"
        return header_line(state, self.w.name, self.member, extra)

    # --- plain HTTP -----------------------------------------------------------------------------
    def forwarding(self, ex: Exchange) -> None:
        """The exchange's response is parsed through this watch (``_Sink``)."""
        ex.parser.rebind(_Sink(self, ex), ex.head.method)

    # --- tunnels ------------------------------------------------------------------------------
    def connect_reply(self, reply: bytes) -> bytes:
        """The CONNECT ``200`` with the header when the member is not healthy (a SOCKS5 reply as it is)."""
        line = self.header() if reply.startswith(b"HTTP/1.1 200") else None
        return reply if line is None else reply[:-2] + line + b"\r\n"

    # --- the end ------------------------------------------------------------------------------
    def count(self, rec: AccessRecord, signal: str, evidence: str) -> None:
        """Count the signal once (at the response head when the status or a header tells it, so
        the header on that very answer already reflects it; else when the record is finished)."""
        if signal == "throttle" and self.retry_after is not None:
            wait = parse_retry_after(self.retry_after.decode("latin-1"), self.desk.clock())
            if wait:
                self.desk.watch.hold(self.member, self.w.name, self.desk.clock() + wait)
        self.counted = (signal, evidence, self.desk.observe(self.w, self.member, signal, evidence))

    def http_signal(self, rec: AccessRecord) -> tuple[str, str]:
        w = self.w
        if self.marker is None and self.body:
            self.marker = w.body_marker(self.body)
        signal = w.classify(self.status, self.retry_after is not None, self.marker)
        if signal == "ok":
            return signal, ""
        evidence = f"HTTP {self.status} for {rec.method} {shown_target(rec.target)[:200]}"
        if self.marker is not None:
            evidence += f": {self.marker}"
        if self.retry_after is not None:
            evidence += f" (Retry-After: {self.retry_after[:40].decode('latin-1')})"
        return signal, evidence

    def finished(self, rec: AccessRecord, status: int) -> None:
        first = None
        if self.counted is None:
            signal, evidence = None, ""
            if rec.method in TUNNEL_METHODS and status == 200:
                signal, evidence = self._tunnel_signal(rec)
                first = _first_class(self.first)
            elif self.head_seen:
                signal, evidence = self.http_signal(rec)
            elif status in (502, 504) and rec.reason in CONNECT_FAILURES:
                signal, evidence = "connect_fail", f"{rec.reason} to {shown_target(rec.target)[:200]}"
            if signal is None:
                return
            self.count(rec, signal, evidence)
        signal, evidence, tr = self.counted
        w = self.w
        extra = {"provider": w.name, "member": self.member, "signal": signal,
                 "block_state": tr.after if tr is not None else self.desk.watch.state(self.member, w.name)}
        if rec.extra:
            extra = {**rec.extra, **extra}
        if evidence:
            extra["evidence"] = evidence
        if first is not None:
            extra["first_bytes"] = first
        if self.rerouted is not None:
            extra["rerouted_from"] = self.rerouted
        rec.extra = extra

    def _tunnel_signal(self, rec: AccessRecord) -> tuple[str, str]:
        alert = tls_alert(self.first) if self.first else None
        reset = rec.reason in ("upstream_reset", "reset")
        signal = classify_tunnel(bytes_up=rec.bytes_up, bytes_down=rec.bytes_down, reset=reset,
                                 closed_after_first_flight=self.server_first, alert=alert)
        if alert is not None:
            level = "fatal" if alert[0] == 2 else "warning"
            return signal, f"TLS alert {level} {ALERTS.get(alert[1], alert[1])} ({alert[1]}) from {rec.upstream_addr}"
        if signal == "ok":
            return signal, ""
        how = "reset by the server" if reset else "closed by the server" if self.server_first else "ended"
        return signal, (f"tunnel to {shown_target(rec.target)[:200]} {how} after {rec.bytes_up} bytes up, "
                        f"{rec.bytes_down} down")


def _first_class(first: bytes | None) -> str:
    """What a tunnel's server sent first: nothing, a TLS alert, a TLS handshake record, other."""
    if not first:
        return "none"
    if tls_alert(first) is not None:
        return "tls_alert"
    if first[0] == 0x16:
        return "tls_handshake"
    return "other"


class _Sink:
    """The response parser's sink for a watched exchange: the exchange's own, plus a look at
    the head and at most the first ``MARKER_WINDOW`` bytes of the body (never the rest)."""

    __slots__ = ("watch", "ex")

    def __init__(self, watch: Watch, ex: Exchange) -> None:
        self.watch = watch
        self.ex = ex

    def on_response_head(self, head: ResponseHead) -> None:
        ex = self.ex
        ex.on_response_head(head)
        if head.informational:
            return
        watch = self.watch
        watch.head_seen = True
        watch.status = head.status
        if head.status in (429, 503):
            for name, value in head.headers:
                if name.lower() == b"retry-after":
                    watch.retry_after = value
                    break
        if watch.w.headers:
            watch.marker = watch.w.header_marker(head.headers)
        rec = ex.record
        signal, evidence = watch.http_signal(rec)
        if signal != "ok" or not watch.w.body:  # (else a body marker may still turn up: at the end)
            watch.count(rec, signal, evidence)
        line = watch.header()
        if line is not None and ex.out:  # (the head is the last thing the exchange queued)
            ex.out[-1] = ex.out[-1][:-2] + line + b"\r\n"

    def on_response_body(self, data: bytes) -> None:
        watch = self.watch
        if watch.w.body and len(watch.body) < MARKER_WINDOW and watch.marker is None:
            watch.body += data[:MARKER_WINDOW - len(watch.body)]
        self.ex.on_response_body(data)

    def on_response_end(self) -> None:
        self.ex.on_response_end()


class WatchedTunnel(Tunnel):
    """A tunnel to a watched destination: its server's first bytes (a TLS alert?) and whether
    the server ended its side first (a reset or close right after the client's first flight)."""

    __slots__ = ("watch",)

    def __init__(self, conn, upstream, record: AccessRecord, now: float, copy_only: bool) -> None:
        self.watch: Watch = record.watch
        super().__init__(conn, upstream, record, now, copy_only)

    def upstream_data(self, data: bytes) -> None:
        if self.watch.first is None:
            self.watch.first = bytes(data[:8])
        Tunnel.upstream_data(self, data)

    def upstream_eof(self) -> bool:
        if not self.up_done:
            self.watch.server_first = True
        return Tunnel.upstream_eof(self)

    def upstream_lost(self, exc: Exception | None) -> None:
        if not self.up_done:
            self.watch.server_first = True
        Tunnel.upstream_lost(self, exc)
