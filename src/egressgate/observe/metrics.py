"""Every metric name in one place. A ``Metrics`` instance owns its own registry (no global
state). Every label value comes from the configuration or from a fixed set in the code: a
client or profile name that is not configured -- say, a profile a refused request asked for
in ``X-Egressgate-Profile`` or ``user+profile`` -- is counted as ``-`` (``UNKNOWN``), methods
outside a fixed list as ``OTHER``, never destination host names. ``set_names`` tells a
``Metrics`` which names the configuration has (at start and on every reload)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

PREFIX = "egressgate_"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE", "SOCKS5"})
# egressgate_socks_replies_total{reply}: how SOCKS5 negotiations ended (RFC 1928 reply codes,
# and the ends before a request: no acceptable method, failed authentication, malformed, slow).
SOCKS_REPLIES = ("succeeded", "general_failure", "not_allowed", "network_unreachable", "host_unreachable",
                 "connection_refused", "ttl_expired", "command_not_supported", "address_type_not_supported",
                 "no_acceptable_method", "auth_failed", "protocol_error", "timeout")
# Where a bug can be caught (``egressgate_internal_errors_total{where}``): a fixed set.
INTERNAL_ERROR_SITES = (
    "connection_made", "data_received", "eof_received", "connection_lost", "pause_writing", "resume_writing",
    "upstream_connection_made", "upstream_data_received", "upstream_eof_received", "upstream_connection_lost",
    "upstream_pause_writing", "upstream_resume_writing", "splice", "tick", "serve", "exchange_failed",
    "teardown", "admin", "probe", "providers", "loop", "workers", "fleet", "other",
)
UNKNOWN = "-"  # the label value of a client or profile name that is not configured
LOG_DROP_REASONS = ("queue_full", "write_error")  # egressgate_log_dropped_total{reason}
ADMIN_CLOSE_REASONS = ("max_connections", "max_per_source", "evicted", "idle_timeout", "foreign")  # ..._closed_total{reason}
# egressgate_protect_queue_wait_seconds (kept as plain counts by ``proxy.waiting``)
QUEUE_WAIT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# How the workers' values of a family merge into the instance's /metrics (``observe.merge``),
# declared with each metric as it is made (the helpers below fill ``MERGE``):
SUM = "sum"  # add up: counters, histograms, and gauges of live state (connections, tunnels)
FIRST = "first"  # worker 0's alone: the configuration, checks every worker repeats, worker 0's own duties
MERGE: dict[str, str] = {}  # family name (without _total) -> SUM or FIRST


def _merged(name: str, merge: str) -> str:
    if merge not in (SUM, FIRST):
        raise ValueError(f"{name}: merge must be SUM or FIRST, not {merge!r}")
    MERGE[name.removesuffix("_total")] = merge
    return name


def gauge(name: str, doc: str, labels=(), *, merge: str, registry) -> Gauge:
    """A gauge; ``merge`` is required: live state adds up (SUM), a copy of the config does not (FIRST)."""
    return Gauge(_merged(PREFIX + name, merge), doc, labels, registry=registry)


def counter(name: str, doc: str, labels=(), *, merge: str = SUM, registry) -> Counter:
    return Counter(_merged(PREFIX + name, merge), doc, labels, registry=registry)


def histogram(name: str, doc: str, labels=(), *, buckets, registry) -> Histogram:
    return Histogram(_merged(PREFIX + name, SUM), doc, labels, buckets=buckets, registry=registry)


def gauge_family(name: str, doc: str, labels=(), *, merge: str) -> GaugeMetricFamily:
    """A gauge family a collector makes when scraped (``merge`` as for ``gauge``)."""
    return GaugeMetricFamily(_merged(PREFIX + name, merge), doc, labels=list(labels))


def counter_family(name: str, doc: str, labels=(), *, merge: str = SUM) -> CounterMetricFamily:
    return CounterMetricFamily(_merged(PREFIX + name, merge), doc, labels=list(labels))


def histogram_family(name: str, doc: str, labels=()) -> HistogramMetricFamily:
    return HistogramMetricFamily(_merged(PREFIX + name, SUM), doc, labels=list(labels))


def merge_policies() -> dict[str, str]:
    """Every family's declared merge (see ``MERGE``): declared as a ``Metrics`` is made."""
    if not MERGE:
        Metrics()
    return MERGE


class _HotCounters:
    """Per-request counters kept as plain integers and turned into metric families only when
    scraped: no lock, no label lookup on the hot path (the event loop is single-threaded)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str, int], int] = {}
        self.bytes: dict[tuple[str, str], int] = {}
        # The access log's own plain counters, read at scrape time (the log knows nothing of
        # prometheus): () -> ({reason: records dropped}, bytes queued).
        self.access_log: Callable[[], tuple[dict[str, int], int]] = lambda: ({}, 0)

    def describe(self):
        return self._families(empty=True)

    def collect(self):
        return self._families(empty=False)

    def _families(self, empty: bool):
        req = counter_family("requests", "Requests and tunnels handled, by outcome",
                                  labels=["client", "profile", "method", "status"])
        byt = counter_family("bytes", "Bytes relayed (up: client to destination)",
                                  labels=["direction", "profile"])
        dropped = counter_family("log_dropped", "Access-log records dropped: the queue to a slow "
                                      "destination was full, or the destination could not be written",
                                      labels=["reason"])
        queued = gauge_family("log_queue_bytes", "Access-log bytes waiting for the writer", merge=SUM)
        if not empty:
            for (client, profile, method, status), n in list(self.requests.items()):
                req.add_metric([client, profile, method, str(status)], n)
            for (direction, profile), n in list(self.bytes.items()):
                byt.add_metric([direction, profile], n)
            counts, waiting = self.access_log()
            for reason in LOG_DROP_REASONS:
                dropped.add_metric([reason], counts.get(reason, 0))
            queued.add_metric([], waiting)
        return [req, byt, dropped, queued]


class _Scraped:
    """A collector of plain counters another part keeps: ``stats()`` (set by whoever keeps them)
    is read when scraped and turned into metric families by ``_families``."""

    def __init__(self) -> None:
        self.stats: Callable[[], dict] = lambda: {}

    def describe(self):
        return self._families({})

    def collect(self):
        return self._families(self.stats())

    @staticmethod
    def _families(stats: dict) -> list:
        raise NotImplementedError


class _ProtectCounters(_Scraped):
    """Shared-IP protection (``proxy.protect``), kept as plain integers by the guard and turned
    into metric families when scraped. Labels: profile, member (a configured source address or
    upstream proxy) and destination (the rule's configured name) -- never a raw host."""

    LIMITS = ("concurrency", "rate", "hold", "queue")

    @staticmethod
    def _families(stats: dict):
        labels = ["profile", "member", "destination"]
        admitted = counter_family("protect_admitted", "Requests and tunnels admitted to a protected "
                                       "destination, per egress member", labels=labels)
        refused = counter_family("protect_refused", "Requests and tunnels refused (429) to protect a "
                                      "shared egress IP: max_concurrent, max_per_second, or an origin's Retry-After "
                                      "hold", labels=[*labels, "limit"])
        in_flight = gauge_family("protect_in_flight", "Open tunnels and requests in flight to a "
                                      "protected destination, per egress member", labels=labels, merge=SUM)
        started = counter_family("protect_holds_started", "Holds started because an origin answered "
                                      "429/503 with Retry-After", labels=labels)
        held = gauge_family("protect_held_hosts", "Hosts currently held (an origin's Retry-After), "
                                 "per egress member and protected destination", labels=labels, merge=FIRST)
        dropped = counter_family("protect_holds_dropped", "Holds not kept for their bound: a client's "
                                      "own hold replaced when its max_holds_per_client share is full (client_share), "
                                      "or a new hold not recorded because the rule's max_holds are other clients' "
                                      "(rule_full)", labels=[*labels, "why"])
        for key, n in stats.get("admitted", {}).items():
            admitted.add_metric(list(key), n)
        for key, n in stats.get("refused", {}).items():
            refused.add_metric(list(key), n)
        for key, n in stats.get("in_flight", {}).items():
            in_flight.add_metric(list(key), n)
        for key, n in stats.get("holds_started", {}).items():
            started.add_metric(list(key), n)
        for key, n in stats.get("held", {}).items():
            held.add_metric(list(key), n)
        for key, n in stats.get("holds_dropped", {}).items():
            dropped.add_metric(list(key), n)
        queued = gauge_family("protect_queued", "Requests and tunnels waiting in a protect rule's hold "
                                   "queue (protect[].queue), per egress member", labels=labels, merge=SUM)
        outcomes = counter_family("protect_queue", "Hold-queue waits by how they ended: "
                                       "admitted_after_wait, timed_out (429), client_gone, queue_full (429)",
                                       labels=[*labels, "outcome"])
        waited = histogram_family("protect_queue_wait_seconds", "Time spent in a protect rule's hold "
                                       "queue, however the wait ended", labels=["profile", "destination"])
        for key, n in stats.get("queued", {}).items():
            queued.add_metric(list(key), n)
        for key, n in stats.get("queue_outcomes", {}).items():
            outcomes.add_metric(list(key), n)
        for key, h in stats.get("queue_waited", {}).items():
            buckets = [(str(bound), h[i]) for i, bound in enumerate(QUEUE_WAIT_BUCKETS)] + [("+Inf", h[-1])]
            waited.add_metric(list(key), buckets, h[-2])
        return [admitted, refused, in_flight, started, held, dropped, queued, outcomes, waited]


class ListenerCounts:
    """One listener's open connections and tunnels, as plain integers the connection code adds to
    and takes from (no lock, no label lookup per connection); exported when scraped."""

    __slots__ = ("connections", "tunnels")

    def __init__(self) -> None:
        self.connections = 0
        self.tunnels = 0


class _ConnectionCounters:
    """``active_connections`` / ``active_tunnels`` per listener and the ``connect_seconds``
    histogram per profile, kept as plain numbers by the hot path and turned into metric
    families when scraped (a prometheus child's ``inc`` and ``observe`` take a lock and a few
    calls each: a tenth of a tunnel's cost)."""

    def __init__(self) -> None:
        self.listeners: dict[str, ListenerCounts] = {}
        # profile -> [count per bucket (the last: above every bound)..., sum of seconds]
        self.connects: dict[str, list] = {}

    def describe(self):
        return self._families()

    def collect(self):
        return self._families()

    def _families(self):
        conns = gauge_family("active_connections", "Open client connections", labels=["listener"], merge=SUM)
        tunnels = gauge_family("active_tunnels", "Open CONNECT tunnels", labels=["listener"], merge=SUM)
        for name, c in list(self.listeners.items()):
            conns.add_metric([name], c.connections)
            tunnels.add_metric([name], c.tunnels)
        hist = histogram_family("connect_seconds", "Upstream TCP connect latency", labels=["profile"])
        for profile, h in list(self.connects.items()):
            running, buckets = 0, []
            for bound, n in zip((*map(str, _LATENCY_BUCKETS), "+Inf"), h, strict=False):
                running += n
                buckets.append((bound, running))
            hist.add_metric([profile], buckets, h[-1])
        return [conns, tunnels, hist]


AUTH_CHECK_KINDS = ("password", "token")  # egressgate_auth_checks_*{kind}
AUTH_DROP_REASONS = ("client_gone", "busy")  # egressgate_auth_checks_dropped_total{reason}


class _AuthCounters(_Scraped):
    """The authentication-check throttles (``proxy.limits.AuthChecks``), read when scraped:
    ``stats()`` -> {kind: {"waiting", "running", "client_gone", "busy"}}."""

    @staticmethod
    def _families(stats: dict):
        waiting = gauge_family("auth_checks_waiting", "Password checks and token signature checks "
                                    "queued for a thread (bounded per source address and in all)", labels=["kind"], merge=SUM)
        running = gauge_family("auth_checks_running", "Password checks and token signature checks "
                                    "running on their threads", labels=["kind"], merge=SUM)
        dropped = counter_family("auth_checks_dropped", "Checks not run: every client waiting for it "
                                      "left (client_gone), or refused 429 over the per-source or total bound (busy)",
                                      labels=["kind", "reason"])
        for kind in AUTH_CHECK_KINDS:
            one = stats.get(kind, {})
            waiting.add_metric([kind], one.get("waiting", 0))
            running.add_metric([kind], one.get("running", 0))
            for reason in AUTH_DROP_REASONS:
                dropped.add_metric([kind, reason], one.get(reason, 0))
        return [waiting, running, dropped]


class _KnownNames:
    """A labelled prometheus metric whose client or profile label (at ``positions``) only ever
    takes a configured name; anything else becomes ``UNKNOWN``. Everything else is the
    metric's own (``clear``, ``remove``, ...)."""

    def __init__(self, metric, positions: tuple[int, ...], known: Callable[[], frozenset[str]]) -> None:
        self._metric = metric
        self._positions = positions
        self._known = known

    def labels(self, *values: str):
        known = self._known()
        if any(values[i] not in known for i in self._positions):
            values = tuple(UNKNOWN if i in self._positions and v not in known else v for i, v in enumerate(values))
        return self._metric.labels(*values)

    def __getattr__(self, name: str):
        return getattr(self._metric, name)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        self._hot = _HotCounters()
        r.register(self._hot)
        self._protect = _ProtectCounters()
        r.register(self._protect)
        self._connections = _ConnectionCounters()
        r.register(self._connections)


        self._auth = _AuthCounters()
        r.register(self._auth)
        self._clients: frozenset[str] = frozenset()  # every client name configured since start
        self._profiles: frozenset[str] = frozenset()  # every profile name configured since start
        clients, profiles = (lambda: self._clients), (lambda: self._profiles)
        self.listener_info = gauge("listener_info", "The proxy listeners in force (value 1) and the "
                                   "protocol each speaks (http, socks5): join on listener", ["listener", "protocol"],
                                   merge=FIRST, registry=r)
        self.spliced_tunnels = counter("tunnels_spliced_total",
                                       "Tunnels switched to zero-copy splice for bulk transfer", registry=r)
        self.dns_seconds = histogram("dns_seconds", "DNS lookup latency (cache misses)",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.denied = counter("denied_total", "Requests refused by policy or the address guard",
                              ["reason"], registry=r)
        self.denied_by_client = _KnownNames(counter("denied_by_client_total",
                                                    "Requests refused by policy, authentication or limits (403, "
                                                    "407, 429), per configured client (- for none)",
                                                    ["client", "reason"], registry=r), (0,), clients)
        self.would_deny = _KnownNames(counter("report_only_denials_total",
                                              "Denials let through because the client is in report mode",
                                              ["client", "reason"], registry=r), (0,), clients)
        self.socks_replies = counter("socks_replies_total",
                                     "SOCKS5 negotiations by how they ended: the reply code sent, or "
                                     "no_acceptable_method, auth_failed, protocol_error, timeout", ["reply"], registry=r)
        for reply in SOCKS_REPLIES:
            self.socks_replies.labels(reply)
        self.upstream_errors = counter("upstream_errors_total", "Failures reaching destinations",
                                       ["kind"], registry=r)
        self.rejected_connections = counter("rejected_connections_total",
                                            "Connections closed at accept (source not allowed, over limits)",
                                            ["reason"], registry=r)
        self.internal_errors = counter("internal_errors_total",
                                       "Bugs caught in a protocol callback or timer (the connection is closed)",
                                       ["where"], registry=r)
        for where in INTERNAL_ERROR_SITES:
            self.internal_errors.labels(where)
        self.reloads = counter("config_reloads_total", "Configuration reloads", ["result"], registry=r)
        self.jwks_fetches = counter("jwks_fetches_total",
                                    "Fetches of Kubernetes token-signing keys from their issuer (ok, error)",
                                    ["result"], registry=r)
        for result in ("ok", "error"):
            self.jwks_fetches.labels(result)  # (exported at 0 from the start: alerts compare the two)
        self.config_info = gauge("config_info", "The loaded configuration (value 1)", ["hash"],
                                 merge=FIRST, registry=r)
        self.config_loaded = gauge("config_last_load_timestamp_seconds",
                                   "When the configuration in force was loaded", merge=FIRST, registry=r)
        self.egress_ip_match = _KnownNames(gauge("egress_ip_match",
                                                 "1 if the profile's observed egress IP is expected, 0 if not, "
                                                 "-1 unknown", ["profile"], merge=FIRST, registry=r), (0,), profiles)
        self.egress_profile_serving = _KnownNames(gauge("egress_profile_serving",
                                                        "1 if the profile carries traffic, 0 if it refuses it "
                                                        "because its egress IP is wrong or unverified (fail closed)",
                                                        ["profile"], merge=FIRST, registry=r), (0,), profiles)
        self.egress_source_up = _KnownNames(gauge("egress_source_up",
                                                  "1 if a profile's source address or upstream is usable",
                                                  ["profile", "member"], merge=FIRST, registry=r), (0,), profiles)
        self.provider_reachable = _KnownNames(gauge("provider_reachable",
                                                    "1 if the provider accepted the last check through this member "
                                                    "(egress.*.providers), 0 if it refused or failed",
                                                    ["profile", "member", "provider"], merge=FIRST, registry=r), (0,), profiles)
        self.provider_checked = _KnownNames(gauge("provider_last_check_timestamp_seconds",
                                                  "When the provider was last checked through this member",
                                                  ["profile", "member", "provider"], merge=FIRST, registry=r), (0,), profiles)
        self.provider_switch_pending = _KnownNames(gauge("provider_switch_pending",
                                                         "1 while a switch: verified reload's new members wait for "
                                                         "every provider to accept them (the old members serve)",
                                                         ["profile"], merge=FIRST, registry=r), (0,), profiles)
        self.egress_block_state = _KnownNames(gauge("egress_block_state",
                                                    "1 for the state a provider's live traffic and checks put a "
                                                    "member in (healthy, throttled, suspected, blocked, "
                                                    "reverified), 0 for the others (egress.*.providers[].match); "
                                                    "summed over workers: how many see that state",
                                                    ["profile", "member", "provider", "state"], merge=SUM, registry=r),
                                              (0,), profiles)
        self.egress_member_carrying = _KnownNames(gauge(
            "egress_member_carrying", "1 if new connections of the profile go to this member now (a "
            "failed-over standby, or an active member not failed over from), 0 if not; role: active or standby "
            "(egress.*.standby)", ["profile", "member", "role"], merge=FIRST, registry=r), (0,), profiles)
        self.egress_failover = _KnownNames(counter(
            "egress_failover_total", "switch: auto failovers: the profile's new connections moved to a "
            "standby member (egress_failover events carry the evidence)", ["profile"], merge=FIRST, registry=r), (0,), profiles)
        self.ready = gauge("ready", "1 when /readyz answers 200", merge=FIRST, registry=r)
        self.reload_ok = gauge("config_last_reload_successful",
                               "1 if the last reload attempt succeeded (or none was made)", merge=FIRST, registry=r)
        self.reload_ok.set(1)
        for result in ("success", "failure"):
            self.reloads.labels(result)
        for reason in ("source_not_allowed", "max_connections", "untrusted_proxy", "proxy_protocol"):
            self.rejected_connections.labels(reason)
        self.admin_connections = gauge("admin_connections", "Open admin listener connections",
                                       merge=FIRST, registry=r)
        self.admin_closed = counter("admin_connections_closed_total",
                                    "Admin connections closed by the gateway: turned away (max_connections, "
                                    "max_per_source), closed while idle to make room for a new one (evicted), or "
                                    "silent or slow past admin.idle_timeout", ["reason"], registry=r)
        for reason in ADMIN_CLOSE_REASONS:
            self.admin_closed.labels(reason)
        self.workers = gauge("workers", "Worker processes: configured (expected) and running (live)",
                             ["state"], merge=FIRST, registry=r)
        self.worker_restarts = counter("worker_restarts_total",
                                       "Worker processes that exited unexpectedly and were started again",
                                       merge=FIRST, registry=r)
        # the fleet store (fleet.redis): worker 0 alone talks to it
        self.fleet_store_up = gauge("fleet_store_up", "1 while the fleet store (Redis) answers in time; 0: "
                                    "the fallback (fleet.fallback) decides shared-IP limits", merge=FIRST, registry=r)
        self.fleet_store_errors = counter("fleet_store_errors_total", "Fleet store operations that failed "
                                          "or were not answered within fleet.redis.timeout", ["op"], registry=r)
        self.fleet_instances = gauge("fleet_instances", "Instances with a live heartbeat in the fleet "
                                     "store, as last seen", merge=FIRST, registry=r)
        self.fleet_rate_slack = gauge("fleet_rate_slack_seconds", "The S of the shared-IP rate bound: over "
                                      "any W seconds at most max(1, rate) + rate * (W + S) are admitted", merge=FIRST, registry=r)

    def listener(self, name: str) -> ListenerCounts:
        """The open-connection and open-tunnel counts of listener ``name`` (one per name, kept
        across reloads)."""
        counts = self._connections.listeners.get(name)
        if counts is None:
            counts = self._connections.listeners[name] = ListenerCounts()
        return counts

    def connected(self, profile: str, seconds: float) -> None:
        """An upstream TCP connect through ``profile`` took ``seconds`` (a name no configuration
        had is counted as ``UNKNOWN``)."""
        if profile not in self._profiles:
            profile = UNKNOWN
        h = self._connections.connects.get(profile)
        if h is None:
            h = self._connections.connects[profile] = [0] * (len(_LATENCY_BUCKETS) + 1) + [0.0]
        h[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        h[-1] += seconds

    def set_names(self, clients: Iterable[str], profiles: Iterable[str]) -> None:
        """The client and profile names of a configuration coming into force. Names stay known
        after a reload drops them (requests under the old configuration still finish and are
        counted under their own names); the set grows only with the configuration, never with
        what clients send."""
        self._clients = self._clients | frozenset(clients)
        self._profiles = self._profiles | frozenset(profiles)

    def watch_access_log(self, stats: Callable[[], tuple[dict[str, int], int]]) -> None:
        """Export the access log's plain counters: ``stats()`` -> ({reason: dropped}, queued bytes)."""
        self._hot.access_log = stats

    def watch_protect(self, stats: Callable[[], dict]) -> None:
        """Export the shared-IP guard's plain counters (``proxy.protect.SharedIpGuard.stats``)."""
        self._protect.stats = stats

    def watch_auth(self, stats: Callable[[], dict]) -> None:
        """Export the authentication-check throttles' plain counters (``proxy.limits.AuthChecks.stats``)."""
        self._auth.stats = stats

    def traffic_by_profile(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (_, profile, _, _), n in list(self._hot.requests.items()):
            entry = out.setdefault(profile, {"requests": 0, "bytes_up": 0, "bytes_down": 0})
            entry["requests"] += n
        for (direction, profile), n in list(self._hot.bytes.items()):
            entry = out.setdefault(profile, {"requests": 0, "bytes_up": 0, "bytes_down": 0})
            entry["bytes_" + direction] += n
        return out

    def count_request(self, client: str, profile: str, method: str, status: int) -> None:
        if method not in _METHODS:
            method = "OTHER"
        if client not in self._clients:
            client = UNKNOWN
        if profile not in self._profiles:
            profile = UNKNOWN
        key = (client, profile, method, status)
        requests = self._hot.requests
        requests[key] = requests.get(key, 0) + 1

    def count_bytes(self, profile: str, up: int, down: int) -> None:
        if profile not in self._profiles:
            profile = UNKNOWN
        table = self._hot.bytes
        if up:
            key = ("up", profile)
            table[key] = table.get(key, 0) + up
        if down:
            key = ("down", profile)
            table[key] = table.get(key, 0) + down
