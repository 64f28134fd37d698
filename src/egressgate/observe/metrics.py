"""Every metric name in one place. A ``Metrics`` instance owns its own registry (no global
state); label values are bounded (client and profile names from config, status codes,
reason strings from the code) — never destination host names."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

PREFIX = "egressgate_"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        self.requests = Counter(PREFIX + "requests_total", "Requests and tunnels handled, by outcome",
                                ["client", "profile", "method", "status"], registry=r)
        self.bytes = Counter(PREFIX + "bytes_total", "Bytes relayed (up: client to destination)",
                             ["direction", "profile"], registry=r)
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
        self.reloads = Counter(PREFIX + "config_reloads_total", "Configuration reloads", ["result"], registry=r)
        self.config_info = Gauge(PREFIX + "config_info", "The loaded configuration (value 1)", ["hash"],
                                 registry=r)
        self.config_loaded = Gauge(PREFIX + "config_last_load_timestamp_seconds",
                                   "When the configuration in force was loaded", registry=r)
        self.egress_ip_match = Gauge(PREFIX + "egress_ip_match",
                                     "1 if the profile's observed egress IP is expected, 0 if not, -1 unknown",
                                     ["profile"], registry=r)
        self.egress_source_up = Gauge(PREFIX + "egress_source_up",
                                      "1 if a profile's source address or upstream is usable",
                                      ["profile", "member"], registry=r)
        self.ready = Gauge(PREFIX + "ready", "1 when /readyz answers 200", registry=r)
        self._requests: dict[tuple[str, str, str, int], object] = {}
        self._bytes: dict[tuple[str, str], object] = {}

    def count_request(self, client: str, profile: str, method: str, status: int) -> None:
        key = (client, profile, method, status)
        child = self._requests.get(key)
        if child is None:
            shown = method if method in _METHODS else "OTHER"
            child = self._requests[key] = self.requests.labels(client, profile, shown, str(status))
        child.inc()

    def count_bytes(self, profile: str, up: int, down: int) -> None:
        pair = self._bytes.get(profile)
        if pair is None:
            pair = self._bytes[profile] = (self.bytes.labels("up", profile), self.bytes.labels("down", profile))
        if up:
            pair[0].inc(up)
        if down:
            pair[1].inc(down)
