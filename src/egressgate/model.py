"""Frozen value types shared by every layer. Each validates itself on construction."""

from __future__ import annotations

import base64
import functools
import ipaddress
import time
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from .errors import ClientProtocolError

_MAX_HOST = 253


@dataclass(frozen=True, slots=True)
class HostPort:
    """A destination as the client named it: a host (name or IP literal, no brackets) and a port.

    Hostnames are normalised (lower case, no trailing dot, IDNA to ASCII); IP literals are kept
    in their canonical text form. Numeric shorthands such as ``127.1`` or ``0x7f.0.0.1`` are not
    valid hostnames and are refused rather than guessed at.
    """

    host: str
    port: int
    is_ip: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ClientProtocolError(f"port out of range: {self.port}", reason="bad_port")
        if not self.host or len(self.host) > _MAX_HOST:
            raise ClientProtocolError("missing or over-long host", reason="bad_host")
        object.__setattr__(self, "is_ip", _is_ip(self.host))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse_authority(cls, authority: str, default_port: int | None = None) -> HostPort:
        """Parse ``host:port``, ``[v6]:port`` (and ``host`` when a default port is given).
        Results are memoised: destinations repeat, and HostPort is immutable."""
        return _parse_authority(authority, default_port)

    @classmethod
    def _parse(cls, authority: str, default_port: int | None) -> HostPort:
        authority = authority.strip()
        if authority.startswith("["):
            end = authority.find("]")
            if end < 0:
                raise ClientProtocolError(f"unclosed IPv6 literal in {authority!r}", reason="bad_host")
            host, rest = authority[1:end], authority[end + 1:]
            if ip_or_none(host) is None or ":" not in host:
                raise ClientProtocolError(f"bad IPv6 literal {host!r}", reason="bad_host")
            if rest.startswith(":"):
                port_text = rest[1:]
            elif rest == "" and default_port is not None:
                port_text = str(default_port)
            else:
                raise ClientProtocolError(f"missing port in {authority!r}", reason="bad_port")
        else:
            host, sep, port_text = authority.rpartition(":")
            if not sep:
                if default_port is None:
                    raise ClientProtocolError(f"missing port in {authority!r}", reason="bad_port")
                host, port_text = authority, str(default_port)
            if ":" in host:
                raise ClientProtocolError(f"IPv6 literal must be bracketed: {authority!r}", reason="bad_host")
        if not port_text.isdigit() or len(port_text) > 5:
            raise ClientProtocolError(f"bad port in {authority!r}", reason="bad_port")
        return cls(normalize_host(host), int(port_text))


@functools.lru_cache(maxsize=8192)
def _parse_authority(authority: str, default_port: int | None) -> HostPort:
    return HostPort._parse(authority, default_port)


@functools.lru_cache(maxsize=8192)
def _is_ip(host: str) -> bool:
    return ip_or_none(host) is not None


def parse_socket_address(text: str) -> tuple[str, int]:
    """A local address to listen on: ``IP:PORT`` or ``[IPv6]:PORT``; port 0 lets the kernel choose."""
    text = str(text).strip()
    zero = text.endswith(":0") and not text.endswith("::0")
    hp = HostPort.parse_authority(text[:-1] + "1" if zero else text)
    return hp.host, 0 if zero else hp.port


def ip_or_none(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@functools.lru_cache(maxsize=8192)
def normalize_host(host: str) -> str:
    """Canonical form of a host for matching and dialing; raises on anything ambiguous."""
    if "%" in host:
        raise ClientProtocolError("IPv6 zone identifiers are not accepted", reason="bad_host")
    ip = ip_or_none(host)
    if ip is not None:
        return str(ip)
    host = host.rstrip(".").lower()
    if not host:
        raise ClientProtocolError("empty host", reason="bad_host")
    labels = host.split(".")
    if all(label.isdigit() or _is_hex(label) for label in labels):
        # 2130706433, 0x7f.1, 0177.0.0.1, 127.1: C's inet_aton would accept these; we do not.
        raise ClientProtocolError(f"ambiguous numeric host {host!r}", reason="bad_host")
    if not host.isascii():
        try:
            ascii_host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ClientProtocolError(f"invalid international host name {host!r}", reason="bad_host") from exc
        if ascii_host == host or not ascii_host.isascii():
            raise ClientProtocolError(f"invalid international host name {host!r}", reason="bad_host")
        return normalize_host(ascii_host)  # judged again: full-width digits may spell an IP
    for label in host.split("."):
        if not label or len(label) > 63 or not _HOST_OK.issuperset(label) or label[0] == "-" or label[-1] == "-":
            raise ClientProtocolError(f"invalid host name {host!r}", reason="bad_host")
    return host


_HOST_OK = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


def shown_target(target: str) -> str:
    """A request target as it may be shown (``/status``, the status page, events, and the access
    log unless ``log.full_targets``): without its query string or fragment (API keys, signed-URL
    signatures live there) and without credentials in the authority (``user:password@``).
    ``http://u:p@host/path?key=1`` -> ``http://host/path?``; the ``?`` left says there was one."""
    cut = min((i for i in (target.find("?"), target.find("#")) if i >= 0), default=-1)
    if cut >= 0:
        target = target[:cut] + "?"
    scheme, sep, rest = target.partition("://")
    if sep:
        authority, slash, path = rest.partition("/")
        if "@" in authority:
            target = f"{scheme}://{authority.rsplit('@', 1)[1]}{slash}{path}"
    elif "@" in target.split("/", 1)[0]:  # an authority-form target (CONNECT) with userinfo
        target = target.split("/", 1)[0].rsplit("@", 1)[1] + (
            "/" + target.split("/", 1)[1] if "/" in target else "")
    return target


def _is_hex(label: str) -> bool:
    return len(label) > 2 and label[:2] == "0x" and all(c in "0123456789abcdef" for c in label[2:])


@dataclass(frozen=True, slots=True)
class Client:
    """Who a connection belongs to, once identified. ``name`` is the config's client name."""

    name: str
    addr: str
    profiles: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of policy: allowed or not, why, by which rule, and the profile to use."""

    allow: bool
    reason: str
    rule: str = ""
    profile: str = ""
    report_only: bool = False  # denied by a rule in report mode: logged, but let through


class Releasable(Protocol):
    """Something a request holds until its record is finished (a shared-IP admission)."""

    def release(self) -> None: ...


class Watched(Protocol):
    """A request or tunnel to a provider watched for blocks (``proxy.blocks.Watch``): told how
    it ended, before its record is written."""

    def finished(self, rec: AccessRecord, status: int) -> None: ...


@dataclass(slots=True)
class AccessRecord:
    """The one access-log record of a request or tunnel, filled in as it proceeds."""

    client_addr: str
    listener: str
    start: float
    client: str = "-"
    method: str = "-"
    target: str = "-"
    status: int = 0
    profile: str = "-"
    egress_addr: str = "-"
    upstream_addr: str = "-"
    bytes_up: int = 0
    bytes_down: int = 0
    reason: str = ""
    extra: dict[str, str] | None = None
    egress_ip: str | None = None  # the public IP the egress member used was last attested to leave from
    user: str | None = None  # the proxy user name a refused (407) request tried (never the password)
    protect: Releasable | None = None  # a shared-IP admission (proxy.protect), released when finished
    # What ``egressgate replay`` needs to decide the request again (observe.accesslog: AUTH, ...):
    auth: str | None = None  # how the client identified: none | basic | token | cert (None: it did not)
    requested_profile: str | None = None  # the profile the client asked for (user+profile or the header)
    addresses: list[str] | tuple[str, ...] | None = None  # a name's resolved addresses, as judged
    watch: Watched | None = None  # a provider's destination watched for blocks (issue 30), else None


@dataclass(frozen=True, slots=True)
class DestPattern:
    """One destination rule as written in config: ``*``, ``example.com``, ``*.example.com``,
    ``203.0.113.7``, ``203.0.113.0/24``, ``[2001:db8::/32]``, each optionally with ``:PORT``.

    ``*.example.com`` matches subdomains of example.com, not example.com itself.
    """

    kind: str  # "any" | "exact" | "suffix" | "net"
    value: str  # host, ".suffix", or CIDR text
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> DestPattern:
        raw = str(text).strip()
        if not raw:
            raise ValueError("empty destination pattern")
        port: int | None = None
        body = raw
        if raw.startswith("["):
            end = raw.find("]")
            if end < 0:
                raise ValueError(f"unclosed '[' in {raw!r}")
            body, rest = raw[1:end], raw[end + 1:]
            if rest:
                if not rest.startswith(":") or not rest[1:].isdigit():
                    raise ValueError(f"bad port in {raw!r}")
                port = int(rest[1:])
        elif raw.count(":") == 1:
            body, port_text = raw.split(":")
            if not port_text.isdigit():
                raise ValueError(f"bad port in {raw!r}")
            port = int(port_text)
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port out of range in {raw!r}")
        if body == "*":
            return cls("any", "*", port)
        try:
            net = ipaddress.ip_network(body, strict=False)
            return cls("net", str(net), port)
        except ValueError:
            pass
        try:
            if body.startswith("*."):
                return cls("suffix", "." + normalize_host(body[2:]), port)
            if "*" in body:
                raise ValueError(f"'*' is allowed only as a leading '*.' label: {raw!r}")
            return cls("exact", normalize_host(body), port)
        except ClientProtocolError as exc:
            raise ValueError(f"bad destination pattern {raw!r}: {exc.detail}") from None


@dataclass(frozen=True, slots=True)
class UpstreamProxy:
    """A chained HTTP proxy: ``http://[user:pass@]host:port``. Credentials become a
    ready-made ``Proxy-Authorization`` header value."""

    address: HostPort
    authorization: str | None = None

    @classmethod
    def parse(cls, url: str) -> UpstreamProxy:
        import base64
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(str(url))
        if parts.scheme != "http":
            raise ValueError(f"upstream proxies are http://host:port URLs, got {url!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"an upstream proxy URL has no path or query: {url!r}")
        try:
            hostport = parts.netloc.rpartition("@")[2]
            address = HostPort.parse_authority(hostport, default_port=3128)
        except ClientProtocolError as exc:
            raise ValueError(f"bad upstream proxy address in {url!r}: {exc.detail}") from None
        auth = None
        if parts.username is not None:
            token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            auth = "Basic " + base64.b64encode(token).decode()
        return cls(address, auth)

    def __str__(self) -> str:
        return f"http://{self.address}"


@dataclass(frozen=True, slots=True)
class ScryptHash:
    """A stored proxy password: ``scrypt$N$r$p$salt$digest`` (salt and digest in base64), exactly
    the form ``egressgate hash-password`` writes. Anything weaker or malformed is refused here,
    so a short digest (which would accept one password in 256) or a cheap ``N`` never loads."""

    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    MIN_N: ClassVar[int] = 2**14
    MAX_MEMORY: ClassVar[int] = 256 * 1024 * 1024  # scrypt needs 128 * N * r bytes
    DIGEST_BYTES: ClassVar[int] = 32
    MIN_SALT_BYTES: ClassVar[int] = 16

    def __post_init__(self) -> None:
        if self.n < self.MIN_N or self.n & (self.n - 1):
            raise ValueError(f"scrypt N must be a power of two of at least {self.MIN_N}, not {self.n}")
        if not 1 <= self.r <= 32:
            raise ValueError(f"scrypt r must be from 1 to 32, not {self.r}")
        if not 1 <= self.p <= 16:
            raise ValueError(f"scrypt p must be from 1 to 16, not {self.p}")
        if 128 * self.n * self.r > self.MAX_MEMORY:
            raise ValueError(f"scrypt N={self.n}, r={self.r} needs more than {self.MAX_MEMORY >> 20} MiB")
        if len(self.salt) < self.MIN_SALT_BYTES:
            raise ValueError(f"the salt must be at least {self.MIN_SALT_BYTES} bytes, not {len(self.salt)}")
        if len(self.digest) != self.DIGEST_BYTES:
            raise ValueError(f"the digest must be {self.DIGEST_BYTES} bytes, not {len(self.digest)}")

    @classmethod
    def parse(cls, text: str) -> ScryptHash:
        parts = text.split("$")
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError("not a hash from `egressgate hash-password` (expected scrypt$N$r$p$salt$digest)")
        _, n, r, p, salt, digest = parts
        numbers = []
        for name, value in (("N", n), ("r", r), ("p", p)):
            if not value.isascii() or not value.isdigit() or len(value) > 10:
                raise ValueError(f"scrypt {name} is not a number: {value!r}")
            numbers.append(int(value))
        raw = []
        for name, value in (("salt", salt), ("digest", digest)):
            try:
                raw.append(base64.b64decode(value.encode("ascii"), validate=True))
            except (ValueError, UnicodeEncodeError):
                raise ValueError(f"the {name} is not valid base64") from None
        return cls(numbers[0], numbers[1], numbers[2], raw[0], raw[1])


# --- timestamps ----------------------------------------------------------------------------
# One convention everywhere (access log, /status, whoami, verify --json): a moment is given
# both ways, Unix seconds (a float) and ISO 8601 in UTC with milliseconds, ``...Z``. Documents
# keep their Unix fields under their names and gain ``NAME_iso`` beside each; the access log,
# which has ISO ``ts``, carries ``ts_unix`` (and ``end_ts`` / ``end_ts_unix``) beside it.
TIME_FIELDS = frozenset({"at", "since", "observed_at", "loaded_at", "started_at", "last_seen", "expires", "until"})


def iso8601(t: float) -> str:
    """``2026-12-05T05:40:01.123Z`` (UTC, milliseconds): sorts as text in time order."""
    # the millisecond round(t, 3) names (the access log's ts_unix), not round(t * 1000), which can differ
    seconds, ms = divmod(round(round(t, 3) * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


def parse_iso8601(text: str) -> float:
    """``2026-12-05T05:40:01.123Z`` (as ``iso8601`` writes it; the fraction optional) -> Unix
    seconds; ValueError for anything else."""
    import calendar

    body = text[:-1] if text.endswith("Z") else text
    main, _, frac = body.partition(".")
    if frac and not frac.isdigit():
        raise ValueError(f"bad fraction of a second in {text!r}")
    seconds = calendar.timegm(time.strptime(main, "%Y-%m-%dT%H:%M:%S"))
    # one decimal parse, so "...T05:40:01.123Z" is the very float round(t, 3) gives (ts_unix)
    return float(f"{seconds}.{frac}") if frac else float(seconds)


def parse_moment(text: str) -> float:
    """A moment given by a person: Unix seconds or ISO 8601 UTC (``2026-12-01T09:00:00Z``)."""
    try:
        value = float(text)
    except ValueError:
        return parse_iso8601(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"not a moment: {text!r}")
    return value


def with_iso(doc: object) -> object:
    """``doc`` (JSON-like) with ``NAME_iso`` beside every Unix-seconds field named in
    ``TIME_FIELDS`` (a new document; ``doc`` is not changed)."""
    if isinstance(doc, dict):
        out: dict = {}
        for key, value in doc.items():
            out[key] = with_iso(value)
            if key in TIME_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{key}_iso"] = iso8601(value)
        return out
    if isinstance(doc, list):
        return [with_iso(v) for v in doc]
    return doc
