"""Who is this peer? Compiled client rules: source CIDRs, Basic credentials, TLS client
certificate subject. First matching rule wins; a peer no rule admits is refused at accept.
A request that carries credentials matches only rules with credentials: a wrong password is
a 407, never a fall-through to an anonymous rule listed earlier or later.

Password checks against a scrypt hash are slow on purpose; ``identify`` never runs one on
the caller's thread. When a check is needed it returns a ``PendingCheck`` whose ``run()`` the
caller executes off the event loop; the result is remembered (keyed by a keyed digest of the
credentials, never the password itself) so the next ``identify`` answers at once.

No user enumeration: an unknown user and a wrong password get the same answer
(``REJECTED``); only the reason, which goes to the access record and not to the client,
tells them apart (``unknown_user`` / ``bad_credentials``). The 407 carries the user name
that was tried (bounded, ``USER_LIMIT``) for the record.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import AuthRequired, PolicyDenied
from .passwords import verify_password
from .rules import RuleSet

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
REJECTED = "wrong proxy user name or password"  # the one answer to an unknown user or a wrong password
USER_LIMIT = 64  # characters of a tried user name kept for the access record


@dataclass(frozen=True, slots=True, eq=False)
class ClientPolicy:
    name: str
    nets: tuple[Net, ...] | None  # None: any source address (credentials required then)
    username: str | None = None
    password_hash: str | None = None
    password_plain: str | None = None  # from password_file / password_env
    cert_subject: str | None = None
    profiles: tuple[str, ...] = ()
    allow: RuleSet | None = None
    deny: RuleSet | None = None
    report_only: bool = False
    max_connections: int | None = None
    max_new_per_second: float | None = None
    allow_patterns: tuple[str, ...] | None = None
    deny_patterns: tuple[str, ...] = ()

    def admits_address(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if self.nets is None:
            return True
        return any(ip.version == n.version and ip in n for n in self.nets)


@dataclass(frozen=True, slots=True)
class Identity:
    client: ClientPolicy
    requested_profile: str | None  # from a ``user+profile`` username


@dataclass(slots=True)
class PendingCheck:
    """A password check to run off the event loop; then call ``identify`` again."""

    key: bytes
    password: str
    encoded: str
    registry: ClientRegistry
    user: str = ""  # the user name tried (for the record of a refusal)

    def run(self) -> bool:
        ok = verify_password(self.password, self.encoded)
        self.registry._remember(self.key, ok)
        return ok


class ClientRegistry:
    def __init__(self, clients: Sequence[ClientPolicy]) -> None:
        self.clients = tuple(clients)
        self._by_ip: dict[str, tuple[ClientPolicy, ...]] = {}
        self._verified: dict[bytes, bool] = {}
        self._key = os.urandom(32)
        self.by_name = {c.name: c for c in self.clients}

    def candidates(self, address: str) -> tuple[ClientPolicy, ...]:
        """The rules whose source CIDRs admit this address, in order (cached)."""
        try:
            return self._by_ip[address]
        except KeyError:
            pass
        ip = ipaddress.ip_address(address)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        found = tuple(c for c in self.clients if c.admits_address(ip))
        if len(self._by_ip) > 65536:
            self._by_ip.clear()
        self._by_ip[address] = found
        return found

    def admits(self, address: str) -> bool:
        return bool(self.candidates(address))

    def identify(self, address: str, authorization: bytes | None,
                 cert_subject: str | None = None) -> Identity | PendingCheck:
        creds = _basic_credentials(authorization) if authorization else None
        wanted_credentials = False
        for client in self.candidates(address):
            if client.username is not None:
                wanted_credentials = True
                if creds is None:
                    continue
                user, password = creds
                profile = None
                if user != client.username:
                    base, plus, profile = user.rpartition("+")
                    if not plus or base != client.username or not profile:
                        continue
                verdict = self._check(client, user, password)
                if isinstance(verdict, PendingCheck):
                    return verdict
                if verdict:
                    return Identity(client, profile)
                raise rejected(user, "bad_credentials")
            if creds is not None:
                continue  # credentials were presented: only an entry with credentials may match them
            if client.cert_subject is not None:
                if cert_subject == client.cert_subject:
                    return Identity(client, None)
                continue
            return Identity(client, None)
        if creds is not None:
            raise rejected(creds[0], "unknown_user")
        if wanted_credentials:
            raise AuthRequired("proxy credentials required", reason="auth_required")
        raise PolicyDenied("no client rule admits this connection", reason="client_not_allowed")

    def _check(self, client: ClientPolicy, user: str, password: str) -> bool | PendingCheck:
        if client.password_plain is not None:
            return hmac.compare_digest(password.encode(), client.password_plain.encode())
        key = hmac.new(self._key, f"{client.name}\0{user}\0{password}".encode(), hashlib.sha256).digest()
        known = self._verified.get(key)
        if known is not None:
            return known
        return PendingCheck(key, password, client.password_hash or "", self, user)

    def _remember(self, key: bytes, ok: bool) -> None:
        if len(self._verified) > 4096:
            self._verified.clear()
        self._verified[key] = ok


def rejected(user: str, reason: str) -> AuthRequired:
    """The 407 for credentials that do not match: the same detail whatever the reason."""
    return AuthRequired(REJECTED, reason=reason, user=user if len(user) <= USER_LIMIT else user[:USER_LIMIT] + "...")


def _basic_credentials(value: bytes) -> tuple[str, str]:
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        raise AuthRequired("only Basic proxy authentication is supported", reason="bad_credentials")
    try:
        user, sep, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        # Still an authentication failure (407 with a challenge), so the client retries properly.
        raise AuthRequired("malformed Basic credentials", reason="bad_credentials") from None
    if not sep:
        raise AuthRequired("malformed Basic credentials", reason="bad_credentials")
    return user, password


def compile_clients(specs: Sequence[object], secret_of: Callable[[object], str | None]) -> ClientRegistry:
    """Build the registry from ``ClientConfig``-shaped objects; ``secret_of`` reads a client's
    password_file / password_env (I/O stays with the caller)."""
    out = []
    for spec in specs:
        nets = None if spec.from_ is None else tuple(ipaddress.ip_network(n) for n in spec.from_)
        out.append(ClientPolicy(
            name=spec.name, nets=nets, username=spec.username, password_hash=spec.password_hash,
            password_plain=secret_of(spec), cert_subject=spec.cert_subject, profiles=tuple(spec.egress),
            allow=None if spec.allow is None else RuleSet(spec.allow), deny=RuleSet(spec.deny),
            report_only=spec.mode == "report", max_connections=spec.max_connections,
            max_new_per_second=spec.max_new_per_second,
            allow_patterns=None if spec.allow is None else tuple(spec.allow), deny_patterns=tuple(spec.deny)))
    return ClientRegistry(out)
