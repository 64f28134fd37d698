"""The server side of one SOCKS5 negotiation as a small state machine (no I/O).

States: GREETING (version and offered methods) -> AUTH (RFC 1929 user/password, only when
that method was chosen) -> REQUEST (command and destination) -> DONE (what follows is
tunnel data, ``rest``) or FAILED.

The driver feeds bytes (``receive``) and asks for the next event (``next_event``: None
when more bytes are needed). After ``MethodsOffered`` it must ``choose_method``; after
``Credentials``, ``auth_result``; after ``ConnectRequest``, ``reply``. Each returns the
bytes to send. Every field is bounded by the protocol (one length byte); bytes waiting
before the negotiation is done are bounded by ``MAX_PENDING``.

Errors raise ``SocksProtocolError`` with the reply to send first when the protocol allows one
(``reply_bytes``, possibly empty) and a reason for the record.
"""

from __future__ import annotations

import base64
import enum
import ipaddress
from dataclasses import dataclass

from ..errors import (
    AuthRequired,
    ClientProtocolError,
    ConnectRefused,
    DnsError,
    GatewayError,
    LimitReached,
    PolicyDenied,
    UpstreamTimeout,
)
from ..model import HostPort

VERSION = 5
AUTH_VERSION = 1
METHOD_NO_AUTH, METHOD_USERPASS, METHOD_NONE_ACCEPTABLE = 0x00, 0x02, 0xFF
CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE = 1, 2, 3
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 1, 3, 4

# Reply codes (RFC 1928 section 6).
SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
CONNECTION_NOT_ALLOWED = 0x02
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04
CONNECTION_REFUSED = 0x05
TTL_EXPIRED = 0x06
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_TYPE_NOT_SUPPORTED = 0x08
REPLY_NAMES = {
    SUCCEEDED: "succeeded", GENERAL_FAILURE: "general_failure", CONNECTION_NOT_ALLOWED: "not_allowed",
    NETWORK_UNREACHABLE: "network_unreachable", HOST_UNREACHABLE: "host_unreachable",
    CONNECTION_REFUSED: "connection_refused", TTL_EXPIRED: "ttl_expired",
    COMMAND_NOT_SUPPORTED: "command_not_supported", ADDRESS_TYPE_NOT_SUPPORTED: "address_type_not_supported",
}
MAX_PENDING = 4096  # bytes held before the negotiation is done (the largest message is 513)
_SOCKS4_REJECT = b"\x00\x5b\x00\x00\x00\x00\x00\x00"  # "request rejected" in SOCKS4's own format
_COMMANDS = {CMD_BIND: "BIND", CMD_UDP_ASSOCIATE: "UDP ASSOCIATE"}


class State(enum.Enum):
    GREETING = "greeting"
    CHOOSING = "choosing"  # methods offered; the driver chooses
    AUTH = "auth"
    CHECKING = "checking"  # credentials given; the driver checks them
    REQUEST = "request"
    CONNECTING = "connecting"  # the request given; the driver dials and replies
    DONE = "done"
    FAILED = "failed"


class SocksProtocolError(ClientProtocolError):
    """The client's negotiation is not acceptable. ``reply_bytes``: what to send before
    closing (empty when the protocol has no answer for it)."""

    reason = "socks_protocol_error"

    def __init__(self, detail: str, *, reply_bytes: bytes = b"", reason: str | None = None) -> None:
        super().__init__(detail, reason=reason)
        self.reply_bytes = reply_bytes


@dataclass(frozen=True, slots=True)
class MethodsOffered:
    methods: frozenset[int]


@dataclass(frozen=True, slots=True)
class Credentials:
    user: bytes
    password: bytes = b""

    def __repr__(self) -> str:  # never the password, not even in a traceback
        return f"Credentials(user={self.user!r})"


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    dest: HostPort
    address_type: int


class ServerNegotiation:
    __slots__ = ("state", "buf", "method")

    def __init__(self) -> None:
        self.state = State.GREETING
        self.buf = b""
        self.method: int | None = None

    # --- input -------------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        if self.state is State.DONE or self.state is State.FAILED:
            raise RuntimeError(f"receive() in state {self.state.value}")
        self.buf += data
        if len(self.buf) > MAX_PENDING:
            self._fail()
            raise SocksProtocolError(f"more than {MAX_PENDING} bytes before the SOCKS negotiation ended",
                                     reason="socks_oversized")

    def next_event(self) -> MethodsOffered | Credentials | ConnectRequest | None:
        """The next complete message, or None when more bytes are needed (or the driver owes
        an answer first)."""
        state = self.state
        if state is State.GREETING:
            return self._greeting()
        if state is State.AUTH:
            return self._auth()
        if state is State.REQUEST:
            return self._request()
        return None

    def rest(self) -> bytes:
        """Bytes after the request (early tunnel data); taken once."""
        data, self.buf = self.buf, b""
        return data

    # --- answers -----------------------------------------------------------------------
    def choose_method(self, method: int) -> bytes:
        self._expect(State.CHOOSING)
        self.method = method
        if method == METHOD_NONE_ACCEPTABLE:
            self.state = State.FAILED
        else:
            self.state = State.AUTH if method == METHOD_USERPASS else State.REQUEST
        return bytes((VERSION, method))

    def auth_result(self, ok: bool) -> bytes:
        self._expect(State.CHECKING)
        self.state = State.REQUEST if ok else State.FAILED
        return bytes((AUTH_VERSION, 0 if ok else 1))

    def reply(self, code: int, bound: tuple[str, int] | None = None) -> bytes:
        """The reply to the request: success (``bound``: the gateway's local address of the
        outbound connection) or a failure code; either way the negotiation is over."""
        self._expect(State.CONNECTING)
        self.state = State.DONE if code == SUCCEEDED else State.FAILED
        return reply_bytes(code, bound)

    # --- parsing -----------------------------------------------------------------------
    def _greeting(self) -> MethodsOffered | None:
        buf = self.buf
        if not buf:
            return None
        if buf[0] != VERSION:
            self._fail()
            if buf[0] == 4:
                raise SocksProtocolError("SOCKS4 is not supported; use SOCKS5", reply_bytes=_SOCKS4_REJECT,
                                         reason="socks_version")
            raise SocksProtocolError(f"not a SOCKS5 greeting (first byte {buf[0]:#04x})", reason="socks_version")
        if len(buf) < 2:
            return None
        n = buf[1]
        if n == 0:
            self._fail()
            raise SocksProtocolError("no authentication method offered",
                                     reply_bytes=bytes((VERSION, METHOD_NONE_ACCEPTABLE)), reason="socks_no_method")
        if len(buf) < 2 + n:
            return None
        methods = frozenset(buf[2:2 + n])
        self.buf = buf[2 + n:]
        self.state = State.CHOOSING
        return MethodsOffered(methods)

    def _auth(self) -> Credentials | None:
        buf = self.buf
        if not buf:
            return None
        if buf[0] != AUTH_VERSION:
            self._fail()
            raise SocksProtocolError(f"unknown username/password version {buf[0]}",
                                     reply_bytes=bytes((AUTH_VERSION, 1)), reason="socks_auth_version")
        if len(buf) < 2:
            return None
        ulen = buf[1]
        if ulen == 0:
            self._fail()
            raise SocksProtocolError("empty user name", reply_bytes=bytes((AUTH_VERSION, 1)),
                                     reason="bad_credentials")
        if len(buf) < 3 + ulen:
            return None
        plen = buf[2 + ulen]
        end = 3 + ulen + plen
        if len(buf) < end:
            return None
        creds = Credentials(bytes(buf[2:2 + ulen]), bytes(buf[3 + ulen:end]))
        self.buf = buf[end:]
        self.state = State.CHECKING
        return creds

    def _request(self) -> ConnectRequest | None:
        buf = self.buf
        if len(buf) < 4:
            if buf and buf[0] != VERSION:
                self._version_error(buf[0])
            return None
        if buf[0] != VERSION:
            self._version_error(buf[0])
        if buf[2] != 0:  # RFC 1928 section 4: RSV is X'00'
            self._fail()
            raise SocksProtocolError(f"reserved byte of the request is {buf[2]:#04x}, not 0",
                                     reply_bytes=reply_bytes(GENERAL_FAILURE), reason="socks_reserved")
        cmd, atyp = buf[1], buf[3]
        if atyp == ATYP_IPV4:
            end = 4 + 4
        elif atyp == ATYP_IPV6:
            end = 4 + 16
        elif atyp == ATYP_DOMAIN:
            if len(buf) < 5:
                return None
            end = 5 + buf[4]
        else:
            self._fail()
            raise SocksProtocolError(f"unknown address type {atyp}",
                                     reply_bytes=reply_bytes(ADDRESS_TYPE_NOT_SUPPORTED), reason="socks_address_type")
        if len(buf) < end + 2:
            return None
        if cmd != CMD_CONNECT:
            self._fail()
            name = _COMMANDS.get(cmd, f"command {cmd}")
            raise SocksProtocolError(f"{name} is not supported (CONNECT only)",
                                     reply_bytes=reply_bytes(COMMAND_NOT_SUPPORTED), reason="socks_command")
        port = int.from_bytes(buf[end:end + 2], "big")
        raw = buf[4:end]
        self.buf = buf[end + 2:]
        try:
            if atyp == ATYP_IPV4:
                dest = HostPort(str(ipaddress.IPv4Address(raw)), port)
            elif atyp == ATYP_IPV6:
                dest = HostPort(str(ipaddress.IPv6Address(raw)), port)
            else:
                name = raw[1:]
                if not name or not name.isascii() or any(c <= 0x20 or c in b":[]/@%\x7f" for c in name):
                    raise ClientProtocolError(f"bad destination name {name[:64]!r}", reason="bad_host")
                dest = HostPort.parse_authority(f"{name.decode('ascii')}:{port}")
        except ClientProtocolError as err:
            self._fail()
            raise SocksProtocolError(err.detail, reply_bytes=reply_bytes(GENERAL_FAILURE), reason=err.reason) from None
        self.state = State.CONNECTING
        return ConnectRequest(dest, atyp)

    def _version_error(self, version: int) -> None:
        self._fail()
        raise SocksProtocolError(f"request with version {version}, not 5", reply_bytes=reply_bytes(GENERAL_FAILURE),
                                 reason="socks_version")

    def _expect(self, state: State) -> None:
        if self.state is not state:
            raise RuntimeError(f"answer in state {self.state.value}, expected {state.value}")

    def _fail(self) -> None:
        self.state = State.FAILED
        self.buf = b""


def reply_bytes(code: int, bound: tuple[str, int] | None = None) -> bytes:
    host, port = bound if bound is not None else ("0.0.0.0", 0)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        ip = ipaddress.IPv4Address(0)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes((VERSION, code, 0, atyp)) + ip.packed + (port & 0xFFFF).to_bytes(2, "big")


def reply_code(err: GatewayError) -> int:
    """The SOCKS reply for a refusal or failure (the access record keeps ``err.reason``)."""
    if isinstance(err, (PolicyDenied, AuthRequired, LimitReached)):
        return CONNECTION_NOT_ALLOWED
    if isinstance(err, UpstreamTimeout) or err.reason in ("upstream_timeout", "connect_timeout", "dns_timeout"):
        return TTL_EXPIRED
    if isinstance(err, ConnectRefused) or err.reason == "connection_refused":
        return CONNECTION_REFUSED
    if isinstance(err, DnsError) or err.reason in ("unreachable", "dns_error"):
        return HOST_UNREACHABLE
    return GENERAL_FAILURE


def basic_authorization(creds: Credentials) -> bytes | None:
    """RFC 1929 credentials as a ``Proxy-Authorization: Basic`` value, so the one client
    registry path identifies them (``user+profile`` included). None when the user name holds
    a colon, which Basic cannot carry (no configured user can match it)."""
    if b":" in creds.user:
        return None
    return b"Basic " + base64.b64encode(creds.user + b":" + creds.password)
