"""Per-identity tallies for job receipts: what each client (a token client: each pod) did, kept by
one worker process, updated once per finished record on the path every record already takes
(``observe.outcomes.Outcomes.finished``), in O(1).

For each identity -- ``(client, pod)``, ``pod`` empty unless a Kubernetes token named one -- and
each (profile, destination) it asked for: requests and tunnels that reached the destination,
bytes each way, refusals by reason, holds met (``origin_backoff``), first and last time; and
which egress source address and attested egress IP carried its traffic.

Bounded, whatever the clients do:

- at most ``max_hosts`` destinations per identity; later ones are counted under ``(other)``;
- time in buckets of ``resolution`` seconds (so a receipt can start at ``since``); an identity
  keeps at most ``MAX_BUCKETS`` buckets and ``ENTRIES_PER_HOST`` x ``max_hosts`` destination
  entries across them -- beyond, the two neighbouring buckets spanning the least time are merged
  (older time is then coarser, roughly doubling per step back; a receipt says where its count
  really starts: ``counted_from``, the start of the bucket holding ``since``);
- at most ``max_identities`` identities: the one idle longest is dropped to make room (counted
  in ``evicted``); an identity idle for ``idle_expiry`` seconds is dropped (``expired``).

``export`` gives one identity's (or several's) tallies as plain JSON, ``merge`` adds exports up
(the workers' tallies of one gateway). Worst-case memory: ``max_identities`` x
(``ENTRIES_PER_HOST`` x ``max_hosts`` destination entries of ~250 bytes + ``MAX_BUCKETS`` buckets).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

OTHER = "(other)"
MAX_BUCKETS = 48
ENTRIES_PER_HOST = 4  # destination entries (across buckets) per allowed destination, before buckets merge
SWEEP_EVERY = 30.0  # seconds between looks for idle identities
TUNNEL_METHODS = frozenset({"CONNECT", "SOCKS5"})
WHOAMI_PREFIX = "http://egressgate.whoami"
HOLD_REASON = "origin_backoff"


class HostTally:
    __slots__ = ("requests", "tunnels", "bytes_up", "bytes_down", "refusals", "holds_met", "first", "last")

    def __init__(self, first: float) -> None:
        self.requests = 0
        self.tunnels = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.refusals: dict[str, int] | None = None
        self.holds_met = 0
        self.first = first
        self.last = first

    def add(self, other: HostTally) -> None:
        self.requests += other.requests
        self.tunnels += other.tunnels
        self.bytes_up += other.bytes_up
        self.bytes_down += other.bytes_down
        self.holds_met += other.holds_met
        if other.refusals:
            mine = self.refusals if self.refusals is not None else {}
            for reason, n in other.refusals.items():
                mine[reason] = mine.get(reason, 0) + n
            self.refusals = mine
        self.first = min(self.first, other.first)
        self.last = max(self.last, other.last)

    def view(self) -> dict:
        return {"requests": self.requests, "tunnels": self.tunnels, "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down, "refusals": dict(self.refusals or {}), "holds_met": self.holds_met,
                "first": round(self.first, 3), "last": round(self.last, 3)}


class Bucket:
    __slots__ = ("start", "end", "hosts", "egress")

    def __init__(self, start: float, end: float) -> None:
        self.start = start
        self.end = end
        self.hosts: dict[tuple[str, str], HostTally] = {}  # (profile, destination)
        self.egress: dict[tuple[str, str, str | None], int] = {}  # (profile, source address, egress IP)


class IdentityTally:
    __slots__ = ("client", "pod", "first", "last", "buckets", "known", "entries", "folded")

    def __init__(self, client: str, pod: str, now: float) -> None:
        self.client = client
        self.pod = pod
        self.first = now
        self.last = now
        self.buckets: list[Bucket] = []
        self.known: set[tuple[str, str]] = set()  # destinations with their own entry (at most max_hosts)
        self.entries = 0  # destination entries across buckets
        self.folded = 0  # records counted under (other)


class Tallies:
    """One worker's tallies. ``clock``: wall-clock seconds (records end now)."""

    def __init__(self, max_identities: int = 10000, max_hosts: int = 32, idle_expiry: float = 86400.0,
                 resolution: float = 60.0, clock: Callable[[], float] | None = None) -> None:
        import time

        self.clock = clock or time.time
        self.configure(max_identities, max_hosts, idle_expiry, resolution)
        # client (or (client, pod)) -> its tallies, least recently active first
        self.ids: OrderedDict[str | tuple[str, str], IdentityTally] = OrderedDict()
        self.expired = 0
        self.evicted = 0
        self._next_sweep = 0.0

    def configure(self, max_identities: int, max_hosts: int, idle_expiry: float, resolution: float) -> None:
        """New bounds (a reload): applied from now on; what is kept stays."""
        self.max_identities = max_identities
        self.max_hosts = max_hosts
        self.idle_expiry = idle_expiry
        self.resolution = resolution

    # --- the record path: once per finished record -------------------------------------------
    def note(self, rec) -> None:
        """Count one finished ``AccessRecord``. O(1): dict lookups and additions."""
        client = rec.client
        if client == "-":
            return  # nobody identified (a 407): no identity to tally for
        upstream = rec.upstream_addr
        reason = rec.reason
        if upstream == "-" and not reason:
            return  # neither sent anywhere nor refused: the gateway's own answer (egressgate.whoami)
        now = self.clock()
        extra = rec.extra
        pod = extra.get("pod") if extra else None
        key = (client, pod) if pod else client  # (a tuple only for a pod)
        ids = self.ids
        t = ids.get(key)
        if t is None:
            t = self._new(key, client, pod or "", now)
        else:
            ids.move_to_end(key)
        t.last = now
        buckets = t.buckets
        b = buckets[-1] if buckets else None
        if b is None or now >= b.end:
            b = self._bucket(t, now)
        target = rec.target
        tunnel = rec.method in TUNNEL_METHODS
        dest = target if tunnel else _authority(target)
        hk = (rec.profile, dest)
        h = b.hosts.get(hk)
        if h is None:
            h, hk = self._host(t, b, hk, rec.start)
        if upstream != "-":
            if tunnel:
                h.tunnels += 1
            else:
                h.requests += 1
            ek = (rec.profile, rec.egress_addr, rec.egress_ip)
            b.egress[ek] = b.egress.get(ek, 0) + 1
        else:
            refusals = h.refusals
            if refusals is None:
                refusals = h.refusals = {}
            refusals[reason] = refusals.get(reason, 0) + 1
            if reason == HOLD_REASON:
                h.holds_met += 1
        h.bytes_up += rec.bytes_up
        h.bytes_down += rec.bytes_down
        if rec.start < h.first:
            h.first = rec.start
        h.last = now
        if now >= self._next_sweep:
            self.sweep(now)

    def _new(self, key: str | tuple[str, str], client: str, pod: str, now: float) -> IdentityTally:
        ids = self.ids
        while len(ids) >= self.max_identities:
            ids.popitem(last=False)  # the one idle longest
            self.evicted += 1
        t = ids[key] = IdentityTally(client, pod, now)
        return t

    def _bucket(self, t: IdentityTally, now: float) -> Bucket:
        start = now - now % self.resolution
        b = Bucket(start, start + self.resolution)
        t.buckets.append(b)
        if len(t.buckets) > MAX_BUCKETS:
            _merge_buckets(t)
        return b

    def _host(self, t: IdentityTally, b: Bucket, hk: tuple[str, str], start: float) -> tuple[HostTally, tuple]:
        if hk not in t.known:
            if len(t.known) < self.max_hosts:
                t.known.add(hk)
            else:
                t.folded += 1
                hk = (hk[0], OTHER)
                found = b.hosts.get(hk)
                if found is not None:
                    return found, hk
        h = b.hosts[hk] = HostTally(start)
        t.entries += 1
        while t.entries > ENTRIES_PER_HOST * self.max_hosts and len(t.buckets) > 1:
            _merge_buckets(t)
        return h, hk

    def sweep(self, now: float) -> None:
        """Drop identities idle for ``idle_expiry`` (the least recently active come first)."""
        self._next_sweep = now + SWEEP_EVERY
        ids = self.ids
        limit = now - self.idle_expiry
        while ids:
            first = next(iter(ids.values()))
            if first.last > limit:
                break
            ids.popitem(last=False)
            self.expired += 1

    # --- reading ------------------------------------------------------------------------------
    def matching(self, client: str | None, pod: str | None) -> list[IdentityTally]:
        return [t for t in self.ids.values()
                if (client is None or t.client == client) and (pod is None or t.pod == pod)]

    def export(self, client: str | None = None, pod: str | None = None, since: float | None = None) -> dict:
        """The tallies of the identities matching ``client`` and/or ``pod``, from the bucket
        holding ``since`` on (plain JSON; ``merge`` adds several up)."""
        self.sweep(self.clock())
        found = self.matching(client, pod)
        hosts: dict[tuple[str, str], HostTally] = {}
        egress: dict[tuple[str, str, str | None], int] = {}
        counted_from = None
        for t in found:
            for b in t.buckets:
                if since is not None and b.end <= since:
                    continue
                counted_from = b.start if counted_from is None else min(counted_from, b.start)
                for hk, h in b.hosts.items():
                    mine = hosts.get(hk)
                    if mine is None:
                        mine = hosts[hk] = HostTally(h.first)
                    mine.add(h)
                for ek, n in b.egress.items():
                    egress[ek] = egress.get(ek, 0) + n
        return {
            "identities": [{"client": t.client, "pod": t.pod or None, "first": round(t.first, 3),
                            "last": round(t.last, 3), "folded": t.folded} for t in found],
            "destinations": [{"profile": p, "destination": d, **h.view()} for (p, d), h in hosts.items()],
            "egress": [{"profile": p, "source": s, "egress_ip": ip, "records": n} for (p, s, ip), n in egress.items()],
            "counted_from": counted_from, "expired": self.expired, "evicted": self.evicted,
        }


def merge(exports: Iterable[dict]) -> dict:
    """Several workers' ``export``s of one query, added up."""
    identities: dict[tuple[str, str | None], dict] = {}
    hosts: dict[tuple[str, str], HostTally] = {}
    egress: dict[tuple[str, str, str | None], int] = {}
    counted_from = None
    expired = evicted = 0
    for doc in exports:
        for i in doc["identities"]:
            key = (i["client"], i["pod"])
            known = identities.get(key)
            if known is None:
                identities[key] = dict(i)
            else:
                known["first"] = min(known["first"], i["first"])
                known["last"] = max(known["last"], i["last"])
                known["folded"] += i["folded"]
        for d in doc["destinations"]:
            h = HostTally(d["first"])
            h.requests, h.tunnels, h.bytes_up, h.bytes_down = d["requests"], d["tunnels"], d["bytes_up"], d["bytes_down"]
            h.refusals, h.holds_met, h.last = dict(d["refusals"]), d["holds_met"], d["last"]
            key = (d["profile"], d["destination"])
            if key in hosts:
                hosts[key].add(h)
            else:
                hosts[key] = h
        for e in doc["egress"]:
            ek = (e["profile"], e["source"], e["egress_ip"])
            egress[ek] = egress.get(ek, 0) + e["records"]
        if doc["counted_from"] is not None:
            counted_from = doc["counted_from"] if counted_from is None else min(counted_from, doc["counted_from"])
        expired += doc["expired"]
        evicted += doc["evicted"]
    return {
        "identities": sorted(identities.values(), key=lambda i: (i["client"], i["pod"] or "")),
        "destinations": sorted(({"profile": p, "destination": d, **h.view()} for (p, d), h in hosts.items()),
                               key=lambda d: (d["profile"], d["destination"])),
        "egress": sorted(({"profile": p, "source": s, "egress_ip": ip, "records": n}
                          for (p, s, ip), n in egress.items()), key=lambda e: (e["profile"], e["source"])),
        "counted_from": counted_from, "expired": expired, "evicted": evicted,
    }


def _merge_buckets(t: IdentityTally) -> None:
    """Fold two neighbouring buckets into one: the pair spanning the least time for how long
    ago it was (the current bucket aside), so time gets coarser the further back it is and the
    recent past stays fine. Nothing is lost; O(MAX_BUCKETS), once per new bucket at most."""
    buckets = t.buckets
    last = len(buckets) - 2  # (the current bucket keeps taking records: not merged)
    now = buckets[-1].end
    # the pair whose merged span is smallest against how long ago it ended
    i = min(range(max(last, 1)),
            key=lambda j: (buckets[j + 1].end - buckets[j].start) / (now - buckets[j + 1].end + 1.0))
    old, into = buckets[i], buckets[i + 1]
    for hk, h in old.hosts.items():
        mine = into.hosts.get(hk)
        if mine is None:
            into.hosts[hk] = h
        else:
            mine.add(h)
            t.entries -= 1
    for ek, n in old.egress.items():
        into.egress[ek] = into.egress.get(ek, 0) + n
    into.start = old.start
    del buckets[i]


def _authority(target: str) -> str:
    """The ``host[:port]`` of an absolute URI (``http://host:port/path``), the target itself otherwise."""
    if target.startswith("http://"):
        end = target.find("/", 7)
        authority = target[7:end] if end > 0 else target[7:]
        return authority.partition("?")[0] if "?" in authority else authority
    return target
