"""Every metric name in one place. A ``Metrics`` instance owns its own registry (no global
state); label values are bounded (client and profile names from config, status codes,
reason strings from the code) — never destination host names."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily

PREFIX = "egressgate_"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
# Where a bug can be caught (``egressgate_internal_errors_total{where}``): a fixed set.
INTERNAL_ERROR_SITES = (
    "connection_made", "data_received", "eof_received", "connection_lost", "pause_writing", "resume_writing",
    "upstream_connection_made", "upstream_data_received", "upstream_eof_received", "upstream_connection_lost",
    "upstream_pause_writing", "upstream_resume_writing", "splice", "tick", "serve", "exchange_failed",
    "teardown", "admin", "probe", "loop", "other",
)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _HotCounters:
    """Per-request counters kept as plain integers and turned into metric families only when
    scraped: no lock, no label lookup on the hot path (the event loop is single-threaded)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str, int], int] = {}
        self.bytes: dict[tuple[str, str], int] = {}

    def describe(self):
        return self._families(empty=True)

    def collect(self):
        return self._families(empty=False)

    def _families(self, empty: bool):
        req = CounterMetricFamily(PREFIX + "requests", "Requests and tunnels handled, by outcome",
                                  labels=["client", "profile", "method", "status"])
        byt = CounterMetricFamily(PREFIX + "bytes", "Bytes relayed (up: client to destination)",
                                  labels=["direction", "profile"])
        if not empty:
            for (client, profile, method, status), n in list(self.requests.items()):
                req.add_metric([client, profile, method, str(status)], n)
            for (direction, profile), n in list(self.bytes.items()):
                byt.add_metric([direction, profile], n)
        return [req, byt]


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        self._hot = _HotCounters()
        r.register(self._hot)
        self.active_connections = Gauge(PREFIX + "active_connections", "Open client connections",
                                        ["listener"], registry=r)
        self.active_tunnels = Gauge(PREFIX + "active_tunnels", "Open CONNECT tunnels", ["listener"], registry=r)
        self.spliced_tunnels = Counter(PREFIX + "tunnels_spliced_total",
                                       "Tunnels switched to zero-copy splice for bulk transfer", registry=r)
        self.connect_seconds = Histogram(PREFIX + "connect_seconds", "Upstream TCP connect latency",
                                         ["profile"], buckets=_LATENCY_BUCKETS, registry=r)
        self.dns_seconds = Histogram(PREFIX + "dns_seconds", "DNS lookup latency (cache misses)",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.denied = Counter(PREFIX + "denied_total", "Requests refused by policy or the address guard",
                              ["reason"], registry=r)
        self.would_deny = Counter(PREFIX + "report_only_denials_total",
                                  "Denials let through because the client is in report mode",
                                  ["client", "reason"], registry=r)
        self.upstream_errors = Counter(PREFIX + "upstream_errors_total", "Failures reaching destinations",
                                       ["kind"], registry=r)
        self.rejected_connections = Counter(PREFIX + "rejected_connections_total",
                                            "Connections closed at accept (source not allowed, over limits)",
                                            ["reason"], registry=r)
        self.internal_errors = Counter(PREFIX + "internal_errors_total",
                                       "Bugs caught in a protocol callback or timer (the connection is closed)",
                                       ["where"], registry=r)
        for where in INTERNAL_ERROR_SITES:
            self.internal_errors.labels(where)
        self.reloads = Counter(PREFIX + "config_reloads_total", "Configuration reloads", ["result"], registry=r)
        self.config_info = Gauge(PREFIX + "config_info", "The loaded configuration (value 1)", ["hash"],
                                 registry=r)
        self.config_loaded = Gauge(PREFIX + "config_last_load_timestamp_seconds",
                                   "When the configuration in force was loaded", registry=r)
        self.egress_ip_match = Gauge(PREFIX + "egress_ip_match",
                                     "1 if the profile's observed egress IP is expected, 0 if not, -1 unknown",
                                     ["profile"], registry=r)
        self.egress_profile_serving = Gauge(PREFIX + "egress_profile_serving",
                                            "1 if the profile carries traffic, 0 if it refuses it because its "
                                            "egress IP is wrong or unverified (fail closed)",
                                            ["profile"], registry=r)
        self.egress_source_up = Gauge(PREFIX + "egress_source_up",
                                      "1 if a profile's source address or upstream is usable",
                                      ["profile", "member"], registry=r)
        self.ready = Gauge(PREFIX + "ready", "1 when /readyz answers 200", registry=r)
        self.reload_ok = Gauge(PREFIX + "config_last_reload_successful",
                               "1 if the last reload attempt succeeded (or none was made)", registry=r)
        self.reload_ok.set(1)
        for result in ("success", "failure"):
            self.reloads.labels(result)
        for reason in ("source_not_allowed", "max_connections", "untrusted_proxy", "proxy_protocol"):
            self.rejected_connections.labels(reason)

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
        key = (client, profile, method, status)
        requests = self._hot.requests
        requests[key] = requests.get(key, 0) + 1

    def count_bytes(self, profile: str, up: int, down: int) -> None:
        table = self._hot.bytes
        if up:
            key = ("up", profile)
            table[key] = table.get(key, 0) + up
        if down:
            key = ("down", profile)
            table[key] = table.get(key, 0) + down
