"""``egressgate replay``: recorded traffic decided again under a candidate config, and what
would change.

Each access-log record is decided again by the gateway's own decision code, not a copy of it:

1. identity (``policy.clients``): a record that identified by source address alone (``auth``
   ``none``), or by a TLS client certificate, is identified again by ``ClientRegistry.identify``
   from its recorded address; credentials cannot be re-verified (no password or token is
   logged), so a ``basic`` or ``token`` record keeps its recorded identity -- the candidate's
   entry of that name (or the first ``kubernetes`` entry listing the service account) -- and is
   refused only if the candidate no longer has that entry or its ``from`` no longer admits the
   recorded address;
2. the route (``proxy.route.route``): destination rules, ports (``connect_ports`` /
   ``socks_ports``), the profile (the recorded ``requested_profile``, else the client's first,
   else the recorded listener's), the address guard and IP deny rules on the addresses the
   record says the name resolved to (``addresses``; else the address dialed) -- never a fresh
   DNS lookup;
3. the member the profile would use first (``ProfilePool.plans``; a move is reported when the
   recorded member is gone from the profile, or when a sticky pick chooses another one);
4. ``protect`` (``proxy.protect.SharedIpGuard``, the very limiter, on a simulated clock): each
   record under a candidate rule is admitted at its start time and released at its end, in
   order of start (records are written in order of end: a reorder window, ``window`` seconds,
   puts them back in order; a record longer than that is admitted when it comes, and counted
   as ``late``). Counts are per member across every worker and instance in the logs, as with a
   fleet store; holds are not replayed (the log does not keep an origin's Retry-After).

The record's own outcome is then compared with the candidate's: newly denied, newly limited
by protect, newly allowed, moved to another profile, moved to another member, refused for
another reason. Records that are not a decision of the config alone are counted, not compared:
refused at authentication (credentials cannot be checked again), per-client connection limits,
a profile refusing while its egress IP was unverified, a request head that never completed,
the gateway's own ``egressgate.whoami`` answers.

Memory is constant in the log's length: decisions are memoised in a bounded table, changes are
kept as groups (client x destination x what changed; at most ``MAX_GROUPS``, the rest folded
into one ``(other)`` group per kind) with ``EXAMPLES`` example records each.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..errors import AuthRequired, GatewayError, LimitReached, PolicyDenied
from ..http1.parse import RequestHead
from ..model import HostPort
from ..observe.accesslog import ADDRESSES, AUTH, REQUESTED_PROFILE
from ..observe.logread import Line
from ..policy.clients import ClientPolicy, Identity, rejected
from ..policy.guard import OwnListeners
from ..proxy.protect import SharedIpGuard
from ..proxy.route import WHOAMI_HOST, judged, route
from ..proxy.runtime import Runtime
from ..proxy.socks import METHOD as SOCKS_METHOD

# kinds of change, in the order they are reported
NEWLY_DENIED = "newly_denied"
NEWLY_LIMITED = "newly_limited"
NEWLY_ALLOWED = "newly_allowed"
MOVED_PROFILE = "moved_profile"
MOVED_MEMBER = "moved_member"
REASON_CHANGED = "reason_changed"
KINDS = (NEWLY_DENIED, NEWLY_LIMITED, NEWLY_ALLOWED, MOVED_PROFILE, MOVED_MEMBER, REASON_CHANGED)
REFUSING = frozenset({NEWLY_DENIED, NEWLY_LIMITED})  # traffic allowed today would be refused: exit 1

PROTECT_REASONS = frozenset({"egress_rate_limit", "egress_concurrency_limit", "origin_backoff"})
CLIENT_LIMIT_REASONS = frozenset({"connection_limit_reached", "rate_limited", "max_connections"})
EGRESS_STATE_REASONS = frozenset({"egress_ip_unverified", "egress_ip_mismatch"})
REPLAYABLE_407 = frozenset({"auth_required"})  # no credentials were presented: identify again by address

MAX_GROUPS = 10000
EXAMPLES = 3
DECISIONS_CACHED = 65536
DEFAULT_WINDOW = 120.0
OTHER = "(other)"


@dataclass(frozen=True, slots=True)
class Outcome:
    """A decision: ``allow`` (with its profile and member), ``deny`` or ``limit`` (with status and
    reason), or ``skip`` (not a decision of the config alone: ``reason`` says why)."""

    kind: str  # "allow" | "deny" | "limit" | "skip"
    reason: str = ""
    status: int = 0
    profile: str = ""
    member: str | None = None  # a member label, or (recorded) the source address the record left from
    detail: str = ""
    upstream: str | None = None  # (recorded) the address dialed: a chained proxy's, for an upstream profile

    def describe(self, member: bool = False) -> str:
        if self.kind == "allow":
            return f"allowed via {self.profile or '-'}" + (f" ({self.member})" if member and self.member else "")
        text = f"{self.status} {self.reason}" if self.status else self.reason
        return text + (f" ({self.detail})" if self.detail else "")


@dataclass(slots=True)
class Group:
    kind: str
    client: str
    destination: str
    before: str
    after: str
    records: int = 0
    examples: list[dict] = field(default_factory=list)

    def view(self) -> dict:
        return {"client": self.client, "destination": self.destination, "from": self.before, "to": self.after,
                "records": self.records, "examples": self.examples}


@dataclass(slots=True)
class Report:
    """What a replay found. ``refusing``: records allowed today that the candidate refuses."""

    records: int = 0
    replayed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    malformed: int = 0
    malformed_lines: list[str] = field(default_factory=list)  # the first ``MALFORMED_SHOWN``
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    groups: dict[tuple, Group] = field(default_factory=dict)
    late: int = 0  # protect: records admitted after their start (longer than the reorder window)
    first: float | None = None
    last: float | None = None

    @property
    def refusing(self) -> int:
        return sum(self.counts[k] for k in REFUSING)

    @property
    def changed(self) -> int:
        return sum(self.counts.values())

    def exit_code(self) -> int:
        return 1 if self.refusing else 0

    def groups_of(self, kind: str) -> list[Group]:
        found = [g for g in self.groups.values() if g.kind == kind]
        found.sort(key=lambda g: (-g.records, g.client, g.destination))
        return found


MALFORMED_SHOWN = 50


class Replayer:
    """Feed ``Line``s in the order they were written (``observe.logread.merged``); ``finish()``
    then gives the ``Report``. ``since``: records that started before it are left out."""

    def __init__(self, rt: Runtime, since: float | None = None, window: float = DEFAULT_WINDOW) -> None:
        self.rt = rt
        self.since = since
        self.window = window
        self.report = Report()
        self._listener_default = {name: spec.egress for name, spec in rt.listeners.items()}
        self._own = _own_listeners(rt)
        self._identities: dict[tuple, ClientPolicy | Outcome] = {}
        self._decisions: dict[tuple, tuple[Outcome, object]] = {}
        # protect: records waiting for their turn (start order), tickets waiting for their end
        self._now = 0.0
        self._guard = SharedIpGuard(lambda: self._now, wall=lambda: self._now)
        self._pending: list[tuple[float, int, Line, Outcome, Outcome, str, str, object]] = []
        self._in_flight: list[tuple[float, int, object]] = []
        self._seq = 0
        self._watermark = float("-inf")

    # --- input ----------------------------------------------------------------------------
    def malformed(self, what: object) -> None:
        self.report.malformed += 1
        if len(self.report.malformed_lines) < MALFORMED_SHOWN:
            self.report.malformed_lines.append(str(what))

    def feed(self, line: Line) -> None:
        if self.since is not None and line.start < self.since:
            return
        if line.end > self._watermark:  # (every record moves the protect timeline on)
            self._watermark = line.end
            pending = self._pending
            cutoff = line.end - self.window
            while pending and pending[0][0] <= cutoff:
                self._admit(*heapq.heappop(pending))
        rep = self.report
        rep.records += 1
        if rep.first is None or line.start < rep.first:
            rep.first = line.start
        if rep.last is None or line.end > rep.last:
            rep.last = line.end
        doc = line.doc
        before = recorded(doc)
        if before.kind == "skip":
            self._skip(before.reason)
            return
        after, dest, rule = self.decide(doc)
        if after.kind == "skip":
            self._skip(after.reason)
            return
        rep.replayed += 1
        client = str(doc.get("client"))
        if rule is None:
            self._compare(line, before, after, client, dest)
            return
        # under a protect rule: admitted in order of start, once the reorder window has passed it
        self._seq += 1
        heapq.heappush(self._pending, (line.start, self._seq, line, before, after, client, dest, rule))

    def finish(self) -> Report:
        while self._pending:
            self._admit(*heapq.heappop(self._pending))
        return self.report

    def _skip(self, why: str) -> None:
        self.report.skipped[why] = self.report.skipped.get(why, 0) + 1

    # --- deciding again -----------------------------------------------------------------------
    def decide(self, doc: dict) -> tuple[Outcome, str, object]:
        """(the candidate's outcome, the destination as ``host:port``, the protect rule it falls
        under or None). Memoised in two steps, each keyed by everything it depends on: the
        identity (how the record identified, as whom, from where), then the route (who, the
        listener, the request, the addresses)."""
        method = doc["method"]
        target = doc["target"]
        connect = method == "CONNECT" or method == SOCKS_METHOD
        authority = target if connect else _authority(target)
        auth = doc.get(AUTH)
        if doc["status"] == 407 or doc.get("reason") == "client_not_allowed":
            auth = "none"  # (only replayable refusals get here: no credentials were presented)
        requested = doc.get(REQUESTED_PROFILE)
        who_key = (auth, doc["client"], doc["client_addr"])
        who = self._identities.get(who_key)
        if who is None:
            who = self._identify(auth, doc)
            if len(self._identities) >= DECISIONS_CACHED:
                self._identities.clear()
            self._identities[who_key] = who
        if isinstance(who, Outcome):
            return who, authority, None
        addresses = doc.get(ADDRESSES)
        key = (who, requested, doc.get("listener"), method, authority,
               tuple(addresses) if isinstance(addresses, list) else None,
               None if addresses else doc.get("upstream_addr"))
        found = self._decisions.get(key)
        if found is None:
            found = self._decide(doc, Identity(who, requested), method, connect, authority, addresses)
            if len(self._decisions) >= DECISIONS_CACHED:
                self._decisions.clear()
            self._decisions[key] = found
        outcome, rest = found
        if rest is None:
            return outcome, authority, None
        dest, rule = rest
        return outcome, dest, rule

    def _identify(self, auth: str | None, doc: dict) -> ClientPolicy | Outcome:
        try:
            return identify(self.rt, auth, str(doc["client"]), str(doc["client_addr"]))
        except GatewayError as err:
            return refusal(err)

    def _decide(self, doc: dict, identity: Identity, method: str, connect: bool, authority: str,
                addresses: object) -> tuple[Outcome, tuple[str, object] | None]:
        rt = self.rt
        listener = doc.get("listener")
        if listener not in self._listener_default:
            return Outcome("deny", "listener_removed", 0, detail=f"the candidate does not listen on {listener}"), None
        try:
            head = RequestHead(method if method != SOCKS_METHOD else "CONNECT",
                               authority if connect else f"http://{authority}/", "HTTP/1.1", [], True, None, False, 0,
                               frozenset())
            r = route(head, connect, identity, rt, self._listener_default[listener], self._own,
                      socks=method == SOCKS_METHOD)
        except GatewayError as err:
            if err.reason in ("bad_request", "bad_target", "bad_scheme", "bad_host", "bad_port", "origin_form"):
                return Outcome("skip", "not a valid request"), None
            return refusal(err), None
        if r.whoami:
            return Outcome("skip", "the gateway's own answer (egressgate.whoami)"), None
        dest = str(r.dest)
        if not r.ready:
            known = _addresses(addresses, doc.get("upstream_addr"))
            if known:
                try:
                    judged(r, known, rt, self._own)
                except GatewayError as err:
                    return refusal(err), (dest, None)
        member = r.plans[0].label if r.plans else None
        protect = rt.protect.get(r.pool.name)
        rule = protect.match(r.dest) if protect is not None else None
        return Outcome("allow", profile=r.pool.name, member=member), (dest, rule)

    # --- protect, on the recorded timeline --------------------------------------------------------
    def _admit(self, start: float, seq: int, line: Line, before: Outcome, after: Outcome, client: str, dest: str,
               rule) -> None:
        if start < self._now:
            self.report.late += 1  # longer than the reorder window: admitted as it comes
        else:
            self._now = start
        while self._in_flight and self._in_flight[0][0] <= self._now:
            heapq.heappop(self._in_flight)[2].release()
        host = dest.rsplit(":", 1)[0].strip("[]")
        try:
            ticket = self._guard.admit(after.profile, after.member or "direct", rule, host)
        except LimitReached as err:
            after = Outcome("limit", err.reason, 429, after.profile, after.member, f"protect {rule.name}")
        else:
            # a record refused today took no time; admitted now, it is counted for that long
            heapq.heappush(self._in_flight, (max(line.end, self._now), seq, ticket))
        self._compare(line, before, after, client, dest)

    # --- comparing ----------------------------------------------------------------------------------
    def _compare(self, line: Line, before: Outcome, after: Outcome, client: str, dest: str) -> None:
        kind = change(before, after, self.rt)
        if kind is None:
            return
        rep = self.report
        rep.counts[kind] += 1
        member = kind == MOVED_MEMBER
        key = (kind, client, dest, before.describe(member), after.describe(member))
        group = rep.groups.get(key)
        if group is None:
            if len(rep.groups) >= MAX_GROUPS:
                key = (kind, OTHER, OTHER, "", "")
                group = rep.groups.get(key)
            if group is None:
                group = rep.groups[key] = Group(*key)
        group.records += 1
        if len(group.examples) < EXAMPLES:
            doc = line.doc
            group.examples.append({"where": line.where, "ts": doc.get("ts"), "method": doc.get("method"),
                                   "target": str(doc.get("target"))[:300], "status": doc.get("status"),
                                   "reason": doc.get("reason") or ""})


def replay(rep: Replayer, lines: Iterable[Line], progress: Callable[[int, Line], None] | None = None) -> Report:
    """Feed every line to ``rep`` (the reader reports malformed ones to ``rep.malformed``)."""
    for n, line in enumerate(lines, 1):
        rep.feed(line)
        if progress is not None and not n & 4095:
            progress(n, line)
    return rep.finish()


# --- the recorded outcome ---------------------------------------------------------------------------

def recorded(doc: dict) -> Outcome:
    """What the gateway decided when the record was written."""
    method, target = doc["method"], doc["target"]
    if method == "-" or target == "-" or not isinstance(target, str) or not isinstance(method, str):
        return Outcome("skip", "no complete request")
    if WHOAMI_HOST in target and (_authority(target).split(":")[0] == WHOAMI_HOST):
        return Outcome("skip", "the gateway's own answer (egressgate.whoami)")
    status = doc["status"]
    reason = doc.get("reason") or ""
    connected = doc.get("upstream_addr", "-") != "-"
    if reason and not connected:
        if status == 407:
            return Outcome("deny", reason, 407) if reason in REPLAYABLE_407 else \
                Outcome("skip", "refused at authentication (credentials cannot be checked again)")
        if reason in CLIENT_LIMIT_REASONS:
            return Outcome("skip", "per-client connection limits (not replayed)")
        if reason in EGRESS_STATE_REASONS:
            return Outcome("skip", "the profile refused while its egress IP was unverified")
        if reason in PROTECT_REASONS:
            return Outcome("limit", reason, status, doc.get("profile") or "", _member_text(doc.get("egress_addr")))
        if status == 403:
            return Outcome("deny", reason, status, doc.get("profile") or "")
        if 400 <= status < 500 and status != 499:
            return Outcome("skip", "not a valid request")
        if doc.get("profile", "-") == "-":
            return Outcome("skip", "ended before it was decided")
    if doc.get(AUTH) is None and doc.get("client", "-") == "-":
        return Outcome("skip", "no client was identified")
    upstream = doc.get("upstream_addr")
    return Outcome("allow", profile=doc.get("profile") or "", member=_member_text(doc.get("egress_addr")),
                   upstream=upstream if isinstance(upstream, str) and upstream != "-" else None)


def change(before: Outcome, after: Outcome, rt: Runtime) -> str | None:
    if before.kind == "allow":
        if after.kind == "deny":
            return NEWLY_DENIED
        if after.kind == "limit":
            return NEWLY_LIMITED
        if after.profile != before.profile:
            return MOVED_PROFILE
        return MOVED_MEMBER if _member_moved(before, after, rt) else None
    if after.kind == "allow":
        return NEWLY_ALLOWED
    return REASON_CHANGED if after.reason != before.reason else None


def _member_moved(before: Outcome, after: Outcome, rt: Runtime) -> bool:
    """Reported when the recorded member is gone from the profile, or a sticky pick (one member
    per client, the same every time) now chooses another; a round-robin or failover pick may use
    any member, so another one there is no change."""
    pool = rt.profiles.get(after.profile)
    if pool is None or before.member is None or pool.kind == "direct":
        return False
    labels = {m.label for m in pool.members}
    if pool.kind == "upstream":  # recorded: the address dialed, the chained proxy's
        proxies = [m.upstream for m in pool.members if m.upstream is not None]
        by_address = {p.address.host: m.label for p, m in zip(proxies, pool.members, strict=False)}
        recorded_label = before.member if before.member.startswith("http://") else by_address.get(before.upstream or "")
        if recorded_label is None:  # a proxy named by host name (its address is not in the config), or gone
            return all(p.address.is_ip for p in proxies)
        if recorded_label not in labels:
            return True
        return pool.pick == "sticky" and len(labels) > 1 and recorded_label != after.member
    if before.member not in labels:
        return True
    return pool.pick == "sticky" and len(labels) > 1 and before.member != after.member


def refusal(err: GatewayError) -> Outcome:
    kind = "limit" if isinstance(err, LimitReached) else "deny"
    detail = err.detail if isinstance(err, AuthRequired) else ""
    if isinstance(err, PolicyDenied):
        detail = _rule_of(err.detail)
    return Outcome(kind, err.reason, err.status, err.profile or "", detail=detail)


def _rule_of(detail: str) -> str:
    """The rule named in a refusal's detail (``... (allow)``), for grouping."""
    if detail.endswith(")") and "(" in detail:
        return "rule: " + detail[detail.rfind("(") + 1:-1]
    return ""


# --- identity ---------------------------------------------------------------------------------------

def identify(rt: Runtime, auth: str | None, client: str, address: str) -> ClientPolicy:
    """The candidate's client entry for a recorded client (see the module docstring); raises the
    refusal the candidate would give (407 / 403)."""
    reg = rt.clients
    if auth is None:  # a log written before ``auth``: as the candidate's entry of that name identifies
        entry = reg.by_name.get(client)
        auth = "token" if "/" in client else entry.auth if entry is not None else "basic"
    if auth == "none":
        return reg.identify(address, None, None).client
    if auth == "cert":
        entry = reg.by_name.get(client)
        return reg.identify(address, None, entry.cert_subject if entry is not None else None).client
    candidates = reg.candidates(address)
    if not candidates:
        raise PolicyDenied("no client rule admits this connection", reason="client_not_allowed")
    if auth == "token":
        tokens = [c for c in candidates if c.token is not None]
        if not tokens:
            raise PolicyDenied("no client rule admits service-account tokens from this address",
                               reason="client_not_allowed")
        entry = next((c for c in tokens if c.token.admits_name(client)), None)
        if entry is None:
            raise AuthRequired("service account not allowed", reason="service_account_not_allowed", user=client)
        return entry
    entry = reg.by_name.get(client)  # basic: the same user name as the entry of the recorded name
    user = entry.username if entry is not None else None
    match = next((c for c in candidates if c.token is None and user is not None and c.username == user), None)
    if match is None:
        raise rejected(client, "unknown_user")
    return match


# --- small helpers ------------------------------------------------------------------------------------

def _authority(target: str) -> str:
    """``host:port`` of an absolute ``http://`` URI (port 80 when it names none)."""
    rest = target.partition("://")[2]
    authority = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
    if authority.endswith("]") or ":" not in authority:
        return authority + ":80"
    return authority


def _addresses(addresses: object, upstream: object) -> list[str] | None:
    if isinstance(addresses, list) and addresses:
        return [str(a) for a in addresses]
    if isinstance(upstream, str) and upstream != "-":
        host = upstream.rsplit(":", 1)[0] if upstream.count(":") == 1 or upstream.startswith("[") else upstream
        host = host.strip("[]")
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            return None
    return None


def _member_text(egress_addr: object) -> str | None:
    """The source address a record left from (a bind member's label); a protect refusal records
    the member's label itself."""
    if not isinstance(egress_addr, str) or egress_addr == "-":
        return None
    if egress_addr.startswith("http://") or egress_addr == "direct":
        return egress_addr
    if egress_addr.startswith("["):
        host = egress_addr[1:].split("]", 1)[0]
    else:
        host = egress_addr.rsplit(":", 1)[0] if egress_addr.count(":") == 1 else egress_addr
    return host


def _own_listeners(rt: Runtime) -> OwnListeners:
    """The candidate's own listeners as configured (a replay has no sockets)."""
    bound = []
    for address in [*rt.listeners, rt.config.admin.address]:
        if not address:
            continue
        try:
            hp = HostPort.parse_authority(address)
        except GatewayError:
            continue
        if hp.is_ip and hp.port:
            bound.append((hp.host, hp.port))
    return OwnListeners.of(bound, [])
