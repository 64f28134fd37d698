"""The configuration schema: frozen pydantic models, every key with a safe default.

An empty document is a valid configuration and equals the embedded default: listen on
127.0.0.1:3128, admin on 127.0.0.1:9128, clients only from loopback, direct egress, private,
loopback, link-local and metadata destinations refused.

Durations are numbers of seconds or strings such as ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"``.
Cross-field checks (a listener naming an unknown profile, ...) live in ``loader`` so that
their errors can point at the exact key.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from ..errors import ClientProtocolError
from ..model import DestPattern, ScryptHash, ip_or_none, normalize_host, parse_socket_address

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _duration(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30, '30s', '500ms' or '5m'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT[m.group(2)]
    else:
        raise ValueError("expected a duration such as 30, '30s', '500ms' or '5m'")
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError("a duration must be a finite number of seconds")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(_duration)]

_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNIT = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def _size(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size such as 8388608, '8MiB' or '512KiB'")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        return int(m.group(1)) * _SIZE_UNIT[m.group(2)]
    raise ValueError("expected a size such as 8388608, '8MiB' or '512KiB'")



def _network(value: object) -> str:
    try:
        return str(ipaddress.ip_network(str(value), strict=False))
    except ValueError:
        raise ValueError(f"not an IP address or CIDR: {value!r}") from None


def _address(value: object) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ValueError(f"not an IP address: {value!r}") from None


Network = Annotated[str, BeforeValidator(_network)]
Address = Annotated[str, BeforeValidator(_address)]
Port = Annotated[int, Field(gt=0, lt=65536)]


def _socket_address(value: object) -> str:
    text = str(value)
    try:
        host, port = parse_socket_address(text)
    except Exception:
        raise ValueError(f"expected HOST:PORT or [IPv6]:PORT, got {text!r}") from None
    if ip_or_none(host) is None:
        raise ValueError(f"listen on an IP address, not a name: {text!r}")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


SocketAddress = Annotated[str, BeforeValidator(_socket_address)]
BindEntry = Annotated[str, BeforeValidator(lambda v: _network(v) if "/" in str(v) else _address(v))]


def _standby_entry(value: object) -> str:
    """A standby member: a proxy URL (``upstream`` profiles, checked by the loader) or, like a
    ``bind`` entry, an address or CIDR (normalised)."""
    text = str(value)
    if "://" in text:
        return text
    return _network(text) if "/" in text else _address(text)


StandbyEntry = Annotated[str, BeforeValidator(_standby_entry)]


def _workers(value: object) -> int:
    if value == "auto":
        import os

        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise ValueError("workers is a number from 1 to 64, or 'auto' (one per CPU)")
    return value


Workers = Annotated[int, BeforeValidator(_workers)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class TLSConfig(_Model):
    cert: str
    key: str
    client_ca: str | None = None  # set to require client certificates (mTLS)


class ListenConfig(_Model):
    address: SocketAddress = "127.0.0.1:3128"
    # http: an HTTP proxy (CONNECT and absolute-URI); socks5: a SOCKS5 proxy (RFC 1928 CONNECT,
    # RFC 1929 username/password) through the same clients, rules, profiles and tunnel.
    protocol: Literal["http", "socks5"] = "http"
    tls: TLSConfig | None = None
    egress: str = "default"  # profile for this listener's clients that name none
    proxy_protocol: bool = False
    trusted_proxies: list[Network] = []  # who may send a PROXY protocol header


class AdminConfig(_Model):
    address: SocketAddress | None = "127.0.0.1:9128"  # null turns the admin listener off
    token: str | None = None  # bearer token required for POST /-/reload
    token_env: str | None = None  # ... or the environment variable holding it
    token_file: str | None = None  # ... or the file holding it (a mounted Secret; re-read on reload)
    # A connection must deliver its request within this, and take its response within this
    # again; otherwise it is closed (counted as egressgate_admin_connections_closed_total).
    idle_timeout: Annotated[float, BeforeValidator(_duration), Field(gt=0)] = 10.0
    max_connections: int = Field(default=64, ge=1)  # open admin connections (see admin.server: room for probes)
    max_connections_per_source: int = Field(default=8, ge=1)  # ... from one client address
    # Host names (besides IP addresses and localhost) the admin listener answers to; any other
    # Host, or a foreign Origin, is refused 403 (a web page reaching it via DNS rebinding or a
    # cross-site form). E.g. the Service name a scraper uses.
    allowed_hosts: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _one_token(self) -> AdminConfig:
        given = [k for k in ("token", "token_env", "token_file") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give one of token, token_env, token_file, not {', '.join(given)}")
        return self


MAX_HOLDS = 4096  # protect[].max_holds default
MAX_HOLDS_PER_CLIENT = 64  # protect[].max_holds_per_client default
MAX_QUEUE_WAIT = 600.0  # protect[].queue.max_wait at most (seconds)


class QueueConfig(_Model):
    """``protect[].queue``: over-budget requests and tunnels wait their turn (in arrival order,
    clients taking turns) instead of an immediate 429; past ``max_wait`` they get the 429."""

    max_wait: Duration = 30.0  # the longest one waits before today's 429 with Retry-After
    max_queued: int = Field(default=100, ge=1, le=100_000)  # waiting per (member x rule); beyond: 429 at once

    @field_validator("max_wait")
    @classmethod
    def _wait_bounded(cls, value: float) -> float:
        if not 0 < value <= MAX_QUEUE_WAIT:
            raise ValueError(f"expected a wait above 0 and at most {MAX_QUEUE_WAIT:g}s (a client's own timeout "
                             f"is shorter than a longer wait)")
        return value


class ProtectConfig(_Model):
    """Shared-IP protection: limits per (egress member x these destinations), across all
    clients of the profile (see ``policy.protect``)."""

    name: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.*:-]+$")
    destinations: list[str] = Field(min_length=1)  # patterns as in clients' allow: host, *.domain, CIDR, :PORT
    max_concurrent: int | None = Field(default=None, gt=0)  # open tunnels + requests in flight per member
    max_per_second: float | None = Field(default=None, gt=0)  # new tunnels + requests per second per member
    # An origin's 429/503 with Retry-After holds (member x host, member x its address) for
    # that long, at most this (0: never hold).
    max_hold: Duration = 300.0
    # Holds kept per profile for this rule, and of those caused by any one client's requests
    # (a client whose share is full replaces its own; nobody evicts another client's hold).
    max_holds: int = Field(default=MAX_HOLDS, ge=1)
    max_holds_per_client: int = Field(default=MAX_HOLDS_PER_CLIENT, ge=1)
    queue: QueueConfig | None = None  # wait for the budget instead of 429 (none: 429 at once)

    @property
    def label(self) -> str:
        """The rule's name in metrics, status and answers: ``name``, else its patterns joined."""
        return self.name or ",".join(self.destinations)[:64]


def _accept(value: object) -> object:
    """``accept``: ``tls`` (a verified TLS handshake is enough), or HTTP statuses: numbers and
    ``LOW-HIGH`` ranges, e.g. ``[200-399, 401]`` -> ``[[200, 399], [401, 401]]``."""
    if value == "tls":
        return value
    if not isinstance(value, list) or not value:
        raise ValueError("expected 'tls' or a list of HTTP statuses and ranges such as [200-399, 401]")
    ranges = []
    for item in value:
        text = str(item).strip()
        low, sep, high = text.partition("-")
        if isinstance(item, bool) or not low.strip().isdigit() or (sep and not high.strip().isdigit()):
            raise ValueError(f"not an HTTP status or LOW-HIGH range: {item!r}")
        lo, hi = int(low), int(high) if sep else int(low)
        if not 100 <= lo <= hi <= 599:
            raise ValueError(f"not a range of HTTP statuses (100-599, low first): {item!r}")
        ranges.append([lo, hi])
    return ranges


def split_url(value: str) -> SplitResult:
    """A configured URL's parts, or a ValueError saying why it is not one (a port out of range or
    not a number included)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (a port out of range or not a number raises here)
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    return parts


class MarkersConfig(_Model):
    """What marks a provider's answer to a job's plain-HTTP request as a block (issue 30): the
    statuses, regexes over the first KiB of the body, and ``"Name: regex"`` header markers."""

    status: list[int] = [401, 403, 451]
    body: list[str] = Field(default=[], max_length=32)
    header: list[str] = Field(default=[], max_length=32)

    @field_validator("status")
    @classmethod
    def _statuses(cls, value: list[int]) -> list[int]:
        bad = [s for s in value if not 100 <= s <= 599]
        if bad:
            raise ValueError(f"not HTTP statuses (100-599): {bad}")
        return value

    @field_validator("body")
    @classmethod
    def _body(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern.encode("utf-8"))
            except re.error as exc:
                raise ValueError(f"not a regular expression: {pattern!r}: {exc}") from None
        return value

    @field_validator("header")
    @classmethod
    def _header(cls, value: list[str]) -> list[str]:
        for item in value:
            name, sep, pattern = item.partition(":")
            if not sep or not name.strip() or not all(c.isalnum() or c in "-_" for c in name.strip()):
                raise ValueError(f"expected 'Name: regex', got {item!r}")
            try:
                re.compile(pattern.strip().encode("utf-8"))
            except re.error as exc:
                raise ValueError(f"not a regular expression in {item!r}: {exc}") from None
        return value


class BlockThresholdsConfig(_Model):
    """When live signals move a (member x provider) pair's state (``egress.blockwatch``): counts
    within a sliding ``window``."""

    window: Annotated[float, BeforeValidator(_duration), Field(gt=0, le=86400)] = 300.0
    throttle_after: int = Field(default=3, ge=1)  # throttle signals (429, 503 + Retry-After) -> throttled
    suspect_after: int = Field(default=3, ge=1)  # block signals -> suspected
    block_after: int = Field(default=10, ge=1)  # block signals -> blocked ...
    block_ratio: float = Field(default=0.5, gt=0, le=1)  # ... making at least this share of the window

    @model_validator(mode="after")
    def _order(self) -> BlockThresholdsConfig:
        if self.block_after < self.suspect_after:
            raise ValueError("block_after must be at least suspect_after")
        return self


class ProviderConfig(_Model):
    """A provider that must accept a profile's egress (see ``egressgate.services.checks``)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    url: str  # https://host[:port]/path (TLS with SNI and verification) or http://
    accept: Annotated[Literal["tls"] | list[tuple[int, int]], BeforeValidator(_accept)] = [(200, 399)]
    method: Literal["HEAD", "GET"] = "HEAD"
    timeout: Annotated[float, BeforeValidator(_duration), Field(gt=0)] | None = None  # default: timeouts.upstream_connect
    interval: Annotated[float, BeforeValidator(_duration), Field(gt=0)] | None = None  # default: probe.interval
    required: bool = False  # new connections avoid a member it refuses; /readyz names it per profile
    # request headers (API keys): "Name: value" lines, from a file or an environment variable
    headers_file: str | None = None
    headers_env: str | None = None
    # a 200 block page or CAPTCHA is a refusal: regexes over the first 64 KiB of the body (GET)
    refuse_body: list[str] = []  # any match: outcome body_refused
    expect_body: str | None = None  # no match: outcome body_refused
    # Block-aware egress (issue 30): the destinations that are this provider's (patterns as in
    # clients' allow); the jobs' own traffic to them moves a state per (member x provider).
    match: list[str] = Field(default=[], max_length=256)
    markers: MarkersConfig = MarkersConfig()
    thresholds: BlockThresholdsConfig = BlockThresholdsConfig()
    on_block: Literal["report", "reroute"] = "report"  # reroute: new connections avoid a blocked member

    @field_validator("match")
    @classmethod
    def _match(cls, value: list[str]) -> list[str]:
        for pattern in value:
            DestPattern.parse(pattern)  # (raises ValueError naming the pattern)
        return value

    @field_validator("refuse_body", "expect_body")
    @classmethod
    def _regex(cls, value):
        import re

        for pattern in [value] if isinstance(value, str) else value or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {pattern!r}: {exc}") from None
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = split_url(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL with a host, got {value!r}")
        if parts.username or parts.password:
            raise ValueError("a provider URL carries no credentials")
        return value

    @model_validator(mode="after")
    def _tls_needs_https(self) -> ProviderConfig:
        if self.accept == "tls" and not self.url.startswith("https://"):
            raise ValueError("accept: tls needs an https:// URL")
        if (self.refuse_body or self.expect_body) and (self.method != "GET" or self.accept == "tls"):
            raise ValueError("refuse_body / expect_body need method: GET and HTTP statuses in accept (a body to read)")
        if self.headers_file and self.headers_env:
            raise ValueError("headers_file and headers_env: name one")
        if self.on_block == "reroute" and not self.match:
            raise ValueError("on_block: reroute needs match: the destinations that are this provider's")
        return self


class FleetTlsConfig(_Model):
    """TLS to the fleet store (``rediss://``): the CA that signed its certificate (Memorystore's
    server CA), and a client certificate if the store asks for one."""

    ca: str | None = None  # PEM file; default: the system's CA store
    cert: str | None = None
    key: str | None = None
    # Check that the certificate names the host of the URL (off for a store reached by an IP
    # its certificate does not carry; the CA is still verified).
    check_hostname: bool = True

    @model_validator(mode="after")
    def _pair(self) -> FleetTlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("give both cert and key, or neither")
        return self


class RedisConfig(_Model):
    """The fleet store: a Redis (e.g. GCP Memorystore) every instance of the gateway shares."""

    url: str  # redis://HOST:PORT[/DB] or rediss://HOST:PORT[/DB] (TLS)
    username: str | None = None  # Redis 6 ACL user (AUTH USER PASSWORD); else AUTH PASSWORD
    password_file: str | None = None  # the AUTH password, from a file (a mounted Secret) ...
    password_env: str | None = None  # ... or from an environment variable
    tls: FleetTlsConfig | None = None  # rediss:// only
    # A store operation on the request path waits at most this; then the fallback applies.
    timeout: Annotated[float, BeforeValidator(_duration), Field(gt=0, le=10)] = 0.25
    # A dead instance's concurrency slots come back within this (its heartbeat stops).
    lease_ttl: Annotated[float, BeforeValidator(_duration), Field(ge=1, le=300)] = 3.0
    prefix: str = Field(default="egressgate", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = split_url(value)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError(f"expected redis://HOST:PORT or rediss://HOST:PORT (TLS), got {value!r}")
        if parts.password:
            raise ValueError("put the password in password_file or password_env, not in the URL")
        if parts.path not in ("", "/") and not parts.path[1:].isdigit():
            raise ValueError(f"the path names a database number, e.g. /0, not {parts.path!r}")
        return value

    @model_validator(mode="after")
    def _checks(self) -> RedisConfig:
        if self.password_file and self.password_env:
            raise ValueError("give one of password_file, password_env, not both")
        if self.tls is not None and not self.url.startswith("rediss://"):
            raise ValueError("tls needs a rediss:// URL")
        return self


class FleetConfig(_Model):
    """What instances of the gateway share (``fleet``): shared-IP limits and holds, in Redis."""

    redis: RedisConfig | None = None
    # Redis down or slow: share -- each instance keeps limit / (instances last seen), rounded
    # down; local -- each instance the whole limit; refuse -- protected destinations get 429.
    fallback: Literal["share", "local", "refuse"] = "share"
    # The number of instances "share" divides by (default: as last seen in the store; an
    # instance that never reached it counts itself alone). Set it to the most instances you run.
    fallback_instances: int | None = Field(default=None, ge=1)


class ProfileConfig(_Model):
    direct: dict | None = None
    bind: list[BindEntry] | None = None  # source addresses, or CIDRs meaning "my address in this range"
    upstream: list[str] | None = None  # http://[user:pass@]host:port chained proxies, in failover order
    upstream_password_file: str | None = None  # the password of the user in the upstream URLs, from a file
    upstream_password_env: str | None = None  # ... or from an environment variable
    expect_ip: list[Address] = []
    # sticky: a client keeps one member; round_robin: spread requests; failover: always in the
    # listed order. Default: sticky for bind pools, failover for upstream proxies.
    pick: Literal["sticky", "round_robin", "failover"] | None = None
    connect_timeout: Duration | None = None
    protect: list[ProtectConfig] = []  # shared-IP protection (policy.protect)
    providers: list[ProviderConfig] = []  # who must accept this profile's egress (checked per member)
    # members that carry no job traffic but are attested and checked like the active ones, of the
    # profile's kind: addresses/CIDRs (bind) or proxy URLs (upstream). Promoting one is a config
    # change (move it to bind/upstream), gated by switch: verified; switch: auto fails over to one.
    standby: list[StandbyEntry] = []
    # immediate: a reload that changes the members moves new connections at once; verified: only
    # once every new member passes every provider check (else the old members stay in force);
    # auto: verified, and new connections move to a standby that passes everything when every
    # active member fails a required provider (or the egress-IP check) failover_after rounds running.
    switch: Literal["immediate", "verified", "auto"] = "immediate"
    failover_after: int | None = Field(None, ge=1, le=100)  # switch: auto only; default 2 consecutive rounds

    @model_validator(mode="after")
    def _one_kind(self) -> ProfileConfig:
        kinds = [k for k in ("direct", "bind", "upstream") if getattr(self, k) is not None]
        if len(kinds) > 1:
            raise ValueError(f"a profile is one of direct, bind or upstream, not {' and '.join(kinds)}")
        if self.bind is not None and not self.bind:
            raise ValueError("bind needs at least one address")
        if self.upstream is not None and not self.upstream:
            raise ValueError("upstream needs at least one proxy URL")
        secrets = [k for k in ("upstream_password_file", "upstream_password_env") if getattr(self, k)]
        if secrets and self.upstream is None:
            raise ValueError(f"{secrets[0]} is for upstream profiles")
        if len(secrets) > 1:
            raise ValueError("give one of upstream_password_file, upstream_password_env")
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError(f"provider names must be unique in a profile: {', '.join(names)}")
        if self.switch == "verified" and not self.providers:
            raise ValueError("switch: verified needs providers to verify new members against")
        return self

    @property
    def failover_rounds(self) -> int:
        """``switch: auto``: consecutive failed rounds before failing over (``failover_after``)."""
        return self.failover_after or 2

    @property
    def kind(self) -> str:
        if self.bind is not None:
            return "bind"
        if self.upstream is not None:
            return "upstream"
        return "direct"


_SERVICE_ACCOUNT = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/(\*|[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?)$")


class KubernetesConfig(_Model):
    """A client identified by a Kubernetes service-account token (a projected, audience-bound
    JWT), verified offline against the issuer's keys (see ``policy.tokens``)."""

    issuer: str  # the cluster's service-account issuer URL (the token's ``iss``)
    audiences: list[str] = Field(default_factory=lambda: ["egressgate"], min_length=1)
    service_accounts: list[str] = Field(min_length=1)  # "namespace/name" or "namespace/*"
    jwks_file: str | None = None  # a local JWKS document; otherwise the issuer's OIDC discovery
    jwks_url: str | None = None  # the JWKS URL, skipping discovery
    ca_file: str | None = None  # CA bundle for https:// to the issuer (default: the system's)
    username: str = Field(default="k8s", min_length=1, pattern=r"^[^:+]+$")  # Basic user ("k8s[+profile]")
    leeway: Annotated[float, BeforeValidator(_duration), Field(le=300)] = 30.0  # clock skew allowed
    refresh: Annotated[float, BeforeValidator(_duration), Field(ge=1)] = 3600.0  # keys re-fetched this often
    # after a token names an unknown key, the keys are re-fetched at most this often
    min_refresh: Annotated[float, BeforeValidator(_duration), Field(ge=0)] = 10.0

    @field_validator("issuer", "jwks_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s?#]+(/[^\s?#]*)?$", value):
            raise ValueError(f"expected an http:// or https:// URL without query or fragment, got {value!r}")
        return value

    @field_validator("service_accounts")
    @classmethod
    def _accounts(cls, value: list[str]) -> list[str]:
        for item in value:
            if not _SERVICE_ACCOUNT.match(item):
                raise ValueError(f"expected 'namespace/serviceaccount' or 'namespace/*', got {item!r}")
        return value

    @model_validator(mode="after")
    def _keys(self) -> KubernetesConfig:
        if self.jwks_file and self.jwks_url:
            raise ValueError("give one of jwks_file, jwks_url")
        if self.jwks_file and self.ca_file:
            raise ValueError("ca_file is for fetching keys from the issuer, not for jwks_file")
        return self


class ClientConfig(_Model):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    from_: list[Network] | None = Field(default=None, alias="from")
    username: str | None = None
    password_hash: str | None = None
    password_file: str | None = None
    password_env: str | None = None
    cert_subject: str | None = None  # TLS client certificate subject CN that identifies this client
    kubernetes: KubernetesConfig | None = None  # identified by a Kubernetes service-account token
    egress: list[str] = []  # profiles it may use; the first is its default
    allow: list[str] | None = None  # destination patterns; absent = any public destination
    deny: list[str] = []
    mode: Literal["enforce", "report"] = "enforce"
    max_connections: int | None = Field(default=None, gt=0)  # concurrent connections (429 beyond)
    max_new_per_second: float | None = Field(default=None, gt=0)  # new connections per second (429 beyond)

    @field_validator("password_hash")
    @classmethod
    def _hash(cls, value: str | None) -> str | None:
        if value is not None:
            ScryptHash.parse(value)  # exactly what `egressgate hash-password` writes, or an error
        return value

    @model_validator(mode="after")
    def _credentials(self) -> ClientConfig:
        secrets = [k for k in ("password_hash", "password_file", "password_env") if getattr(self, k)]
        if self.kubernetes is not None and (self.username or self.cert_subject or secrets):
            raise ValueError("a kubernetes client is identified by its token: no username, password or cert_subject")
        if len(secrets) > 1:
            raise ValueError(f"give one of password_hash, password_file, password_env, not {', '.join(secrets)}")
        if secrets and not self.username:
            raise ValueError(f"{secrets[0]} needs a username")
        if self.username and not secrets:
            raise ValueError("username needs password_hash, password_file or password_env")
        if self.from_ is None and not self.username and not self.cert_subject and self.kubernetes is None:
            raise ValueError("a client needs 'from' CIDRs or credentials; otherwise the gateway is an open proxy")
        return self


def _default_clients() -> list[ClientConfig]:
    return [ClientConfig(name="local", **{"from": ["127.0.0.0/8", "::1/128"]})]


def _name_suffix(value: object) -> str:
    """A name suffix as ``security.deny_suffixes`` / ``allow_suffixes`` take it: ``corp.example``,
    ``*.corp.example`` or ``.corp.example`` (the name and every name under it), normalised as
    destination names are (lower case, no trailing dot, IDNA as ASCII)."""
    text = str(value).strip()
    bare = text[2:] if text.startswith("*.") else text[1:] if text.startswith(".") else text
    try:
        name = normalize_host(bare)
    except ClientProtocolError:
        name = ""
    if not name or ip_or_none(name) is not None:
        raise ValueError(f"expected a host name suffix such as corp.example or *.corp.example, got {text!r}")
    return name


NameSuffix = Annotated[str, BeforeValidator(_name_suffix)]


class SecurityConfig(_Model):
    """Port rules, one per listener protocol: ``connect_ports`` for HTTP ``CONNECT`` (plain HTTP
    forwarding goes to any port), ``socks_ports`` for SOCKS5 ``CONNECT`` (which carries plain HTTP
    too: unset, it is ``connect_ports`` plus 80 and 8080)."""

    connect_ports: list[Port] = [443]
    socks_ports: list[Port] | None = None
    allow_private: list[Network] = []
    # Names that stand for internal addresses (localhost, single-label names, *.internal,
    # *.local, *.svc, ...: policy.guard.NameGuard) are refused before they leave: for chained
    # profiles, whose proxy resolves them on its side (upstream), or for every profile, before
    # DNS (all).
    internal_names: Literal["upstream", "all"] = "upstream"
    deny_suffixes: list[NameSuffix] = []  # more suffixes refused so (a Kubernetes namespace, corp.example)
    allow_suffixes: list[NameSuffix] = []  # names (and the names under them) never refused so

    @property
    def socks_port_set(self) -> frozenset[int]:
        if self.socks_ports is not None:
            return frozenset(self.socks_ports)
        return frozenset(self.connect_ports) | SOCKS_PLAIN_HTTP_PORTS


SOCKS_PLAIN_HTTP_PORTS = frozenset({80, 8080})  # added to connect_ports when socks_ports is unset


class ForwardingConfig(_Model):
    """What forwarded plain-HTTP requests tell the origin about the gateway and the client."""

    via: bool = True  # add "Via: 1.1 egressgate" (a pseudonym) to requests and responses
    # strip: remove client-address fields (X-Forwarded-For, Forwarded, X-Real-IP, ...) the
    # client sent; keep: forward them as sent. The gateway never adds the client's address.
    x_forwarded_for: Literal["strip", "keep"] = "strip"


class TimeoutsConfig(_Model):
    client_head: Duration = 10.0  # from connection (or previous response) to a complete request head
    client_idle: Duration = 60.0  # keep-alive idle between requests
    upstream_connect: Duration = 10.0
    upstream_response: Duration = 60.0  # request sent -> response head
    exchange_idle: Duration = 120.0  # a forwarded request or response moving no body byte either way
    tunnel_idle: Duration = 900.0
    upstream_idle: Duration = 30.0  # idle keep-alive connections to origins are closed after this
    dns: Duration = 5.0


class LimitsConfig(_Model):
    max_head_bytes: int = Field(default=65536, ge=1024)
    max_headers: int = Field(default=100, ge=8)
    max_connections: int = Field(default=20000, ge=1)


class DrainConfig(_Model):
    grace: Duration = 0.0  # keep accepting this long after SIGTERM (load balancer notices /readyz)
    timeout: Duration = 30.0  # then wait this long for open tunnels and requests


class LogConfig(_Model):
    access: str = "stdout"  # stdout, none, or a file path
    format: Literal["json", "squid"] = "json"
    # Bytes of access-log records waiting for a slow destination; beyond: dropped and counted
    # (egressgate_log_dropped_total). Per worker process.
    max_queue: Annotated[int, BeforeValidator(_size), Field(ge=65536)] = 8 << 20
    # Log request targets whole. Off (the default): without query strings and URL credentials
    # (``http://u:p@host/p?key=1`` is logged ``http://host/p?``), like /status and the status page.
    full_targets: bool = False


class ProbeConfig(_Model):
    # IP-echo services (one URL or a list, tried in order for each member until one answers);
    # required for profiles with expect_ip. Several independent ones: one being down changes nothing.
    echo_url: str | list[str] | None = None
    interval: Duration = 300.0
    # A member whose check fails for want of an answer (no echo service answered) keeps its last
    # good attestation for this long after it, so an outage of the echo services does not take every
    # instance out at once; an answer with a wrong IP is never held (fail closed at once). 0: no hold.
    grace: Annotated[float, BeforeValidator(_duration), Field(ge=0, le=3600)] = 600.0
    retry: Duration = 10.0  # how soon to check again while a profile is refusing traffic
    required: bool = True  # profiles refusing traffic count against /readyz (see readiness)
    readiness: Literal["any", "all"] = "any"  # ready while any / only while all attested profiles serve

    @property
    def echo_urls(self) -> tuple[str, ...]:
        """``echo_url`` as a tuple, in the order they are tried (empty: none configured)."""
        if self.echo_url is None:
            return ()
        return (self.echo_url,) if isinstance(self.echo_url, str) else tuple(self.echo_url)


class DnsConfig(_Model):
    cache_ttl: Duration = 30.0  # the most an answer is kept (with servers: also no longer than its TTL)
    negative_ttl: Duration = 5.0
    servers: list[SocketAddress] = []  # ask these name servers directly (IP:PORT) instead of the system resolver


class ReloadConfig(_Model):
    # Reload by itself when the config file's content changes (worker 0 polls it; see
    # egressgate.services.watch). Only with ``serve --config FILE``; SIGHUP and POST /-/reload work either way.
    watch: bool = True
    interval: Annotated[float, BeforeValidator(_duration), Field(ge=0.1, le=3600)] = 2.0  # between polls


class ReceiptsConfig(_Model):
    """Job receipts (``http://egressgate.whoami/receipt``, admin ``GET /receipt``): what each
    client (each pod, for a token client) did, signed with an Ed25519 key."""

    enabled: bool = True
    key_file: str | None = None  # PEM Ed25519 private key (openssl genpkey -algorithm ed25519); unset: made at start
    max_identities: int = Field(default=10000, ge=1)  # clients/pods tallied per worker; beyond: the idlest dropped
    max_hosts: int = Field(default=32, ge=1, le=4096)  # destinations per identity; beyond: counted as "(other)"
    idle_expiry: Annotated[float, BeforeValidator(_duration), Field(gt=0)] = 86400.0  # an idle identity is dropped
    resolution: Annotated[float, BeforeValidator(_duration), Field(ge=1, le=86400)] = 60.0  # ``since`` granularity


class Config(_Model):
    listen: list[ListenConfig] = Field(default_factory=lambda: [ListenConfig()])
    admin: AdminConfig = AdminConfig()
    egress: dict[str, ProfileConfig] = Field(default_factory=lambda: {"default": ProfileConfig(direct={})})
    clients: list[ClientConfig] = Field(default_factory=_default_clients)
    security: SecurityConfig = SecurityConfig()
    forwarding: ForwardingConfig = ForwardingConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    limits: LimitsConfig = LimitsConfig()
    drain: DrainConfig = DrainConfig()
    log: LogConfig = LogConfig()
    probe: ProbeConfig = ProbeConfig()
    dns: DnsConfig = DnsConfig()
    reload: ReloadConfig = ReloadConfig()
    receipts: ReceiptsConfig = ReceiptsConfig()
    workers: Workers = 1  # processes sharing the listeners; "auto" = one per CPU
    fleet: FleetConfig = FleetConfig()  # shared-IP limits and holds across instances (Redis)

    @field_validator("egress", mode="after")
    @classmethod
    def _ensure_default(cls, value: dict[str, ProfileConfig]) -> dict[str, ProfileConfig]:
        if "default" not in value:
            value = {"default": ProfileConfig(direct={}), **value}
        return value
