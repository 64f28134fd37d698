"""Who is this peer? Compiled client rules: source CIDRs, Basic credentials, TLS client
certificate subject. First matching rule wins; a peer no rule admits is refused at accept.
A request that carries credentials matches only rules with credentials: a wrong password is
a 407, never a fall-through to an anonymous rule listed earlier or later.

Password checks against a scrypt hash are slow on purpose; ``identify`` never runs one on
the caller's thread. When a check is needed it returns a ``PendingCheck`` whose ``run()`` the
caller executes off the event loop; the result is remembered (``PasswordVerdicts``: keyed by a
keyed digest of the stored hash and the password, never the password itself) so the next
``identify`` answers at once. A verdict depends on nothing else, so a reload's registry adopts
the old one's verdicts (``adopt``): credentials whose entry kept its hash are known at once
after a reload, and an entry whose hash changed is checked again.

No user enumeration: an unknown user and a wrong password get the same answer
(``REJECTED``); only the reason, which goes to the access record and not to the client,
tells them apart (``unknown_user`` / ``bad_credentials``). The 407 carries the user name
that was tried (bounded, ``USER_LIMIT``) for the record.

A Kubernetes service-account token (``policy.tokens``) identifies an entry with a
``kubernetes`` block: as ``Proxy-Authorization: Bearer TOKEN``, or as Basic with the token as
the password and the entry's ``username`` (``k8s``, or ``k8s+PROFILE``) as the user. The
first such entry admitting the source address whose issuer signed the token and whose list
names the service account wins; the identity carries the ``TokenSubject``. A verified token is
remembered (bounded) until it expires; when the keys lack the token's ``kid`` (or were never
fetched) ``identify`` returns a ``PendingKeys`` to await before asking again. The cheap checks
(shape, algorithm, issuer, audience, times, key id) run in ``identify``; the signature check
does not: ``identify`` returns a ``PendingTokenCheck`` whose ``run()`` the caller executes off
the event loop, bounded as password checks are, then asks again.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from ..errors import AuthRequired, PolicyDenied
from .passwords import verify_password
from .rules import RuleSet
from .tokens import (
    KeyProvider,
    NoKeys,
    TokenPolicy,
    TokenSubject,
    UnknownKey,
    claimed,
    looks_like_token,
    peek,
    precheck,
    signing_key,
    verify_signature,
)

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
REJECTED = "wrong proxy user name or password"  # the one answer to an unknown user or a wrong password
USER_LIMIT = 64  # characters of a tried user name kept for the access record
MAX_REMEMBERED_PASSWORDS = 4096  # good (and, apart, wrong) password verdicts remembered
MAX_REMEMBERED_TOKENS = 4096  # tokens seen (and their verified subjects) remembered until they expire
# refusals no later look can change (not: unknown key / keys unavailable, not yet valid)
FINAL_TOKEN_REFUSALS = frozenset({"token_expired", "token_wrong_audience", "token_unknown_issuer",
                                  "token_bad_signature", "token_bad_algorithm", "token_malformed"})


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
    token: TokenPolicy | None = None  # identified by a Kubernetes service-account token
    # how a request identifies as this client (the access log's ``auth``): token, basic, cert or none
    auth: str = field(init=False, default="none")

    def __post_init__(self) -> None:
        object.__setattr__(self, "auth", "token" if self.token is not None else "basic" if self.username is not None
                           else "cert" if self.cert_subject is not None else "none")

    def admits_address(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if self.nets is None:
            return True
        return any(ip.version == n.version and ip in n for n in self.nets)


@dataclass(frozen=True, slots=True)
class Identity:
    client: ClientPolicy
    requested_profile: str | None  # from a ``user+profile`` username
    subject: TokenSubject | None = None  # the service account of a Kubernetes token

    @property
    def name(self) -> str:
        """The client's name in logs: ``namespace/serviceaccount`` for a token, else the entry's."""
        return self.client.name if self.subject is None else self.subject.name

    def expired(self, now: float) -> bool:
        return self.subject is not None and self.subject.expires + (self.client.token.leeway or 0.0) <= now


@dataclass(slots=True)
class PendingKeys:
    """The issuer's keys must be fetched (or fetched again) before the token can be checked:
    await ``wait()``, then call ``identify`` again. ``error``: the refusal if they still lack it."""

    wait: Callable[[], Awaitable[None]]
    error: AuthRequired


class PasswordVerdicts:
    """Password verdicts remembered: good and wrong apart, each bounded, the oldest evicted one
    at a time, so a flood of wrong passwords never evicts credentials known to be good. Keyed
    by a keyed digest of (stored hash, password): a verdict is a function of those two alone,
    so it outlives the config generation it was reached under (``ClientRegistry.adopt``)."""

    def __init__(self, limit: int = MAX_REMEMBERED_PASSWORDS) -> None:
        self._key = os.urandom(32)
        self.limit = limit
        self.good: dict[bytes, bool] = {}
        self.wrong: dict[bytes, bool] = {}

    def key(self, encoded: str, password: str) -> bytes:
        return hmac.digest(self._key, f"{encoded}\0{password}".encode(), "sha256")  # (one C call)

    def get(self, key: bytes) -> bool | None:
        return self.good.get(key, self.wrong.get(key))

    def remember(self, key: bytes, ok: bool) -> None:
        kept = self.good if ok else self.wrong
        if len(kept) >= self.limit:
            kept.pop(next(iter(kept)), None)
        kept[key] = ok


@dataclass(slots=True)
class PendingCheck:
    """A password check to run off the event loop; then call ``identify`` again."""

    key: bytes
    password: str
    encoded: str
    verdicts: PasswordVerdicts
    user: str = ""  # the user name tried (for the record of a refusal)

    def run(self) -> bool:
        ok = verify_password(self.password, self.encoded)
        self.verdicts.remember(self.key, ok)
        return ok


@dataclass(slots=True, eq=False)
class PendingTokenCheck:
    """A token's signature check for one entry's policy, to run off the event loop; then call
    ``identify`` again (the verdict is remembered). ``error``: the refusal if it fails and the
    refusal is not one to remember (then ``identify`` would ask for the check again)."""

    key: bytes  # the token's digest and the policy's: many requests with one token share a check
    token: str
    policy: TokenPolicy
    signing_key: object
    verified: dict  # the token's remembered verdicts, by policy
    error: AuthRequired | None = None

    def run(self) -> bool:
        try:
            self.verified[self.policy.verdict_key] = verify_signature(self.token, self.policy, self.signing_key)
        except AuthRequired as err:
            refusal = AuthRequired(err.detail, reason=err.reason)  # (no traceback kept: see below)
            if err.reason in FINAL_TOKEN_REFUSALS:
                self.verified[self.policy.verdict_key] = refusal
            self.error = refusal
            return False
        return True


class ClientRegistry:
    def __init__(self, clients: Sequence[ClientPolicy], clock: Callable[[], float] = time.time) -> None:
        self.clients = tuple(clients)
        self.keys: KeyProvider = NoKeys()  # set by the running gateway (keysource.KeySources)
        self._clock = clock
        # keyed digest of a token -> (its issuer, by an entry policy's verdict_key the subject
        # verified or the final refusal)
        self._tokens: dict[bytes, tuple[str, dict[tuple, TokenSubject | AuthRequired]]] = {}
        self.token_users = frozenset(c.token.username for c in self.clients if c.token is not None)
        self._by_ip: dict[str, tuple[ClientPolicy, ...]] = {}
        self.verdicts = PasswordVerdicts()
        self._key = os.urandom(32)
        self.by_name = {c.name: c for c in self.clients}

    def adopt(self, old: ClientRegistry) -> None:
        """Keep ``old``'s password verdicts (a reload): credentials whose entry kept its stored
        hash are known at once, so known clients never queue behind unknown ones after a
        reload. Checks still running under ``old`` land here too (the same object). The same
        for tokens: a verdict is kept by what it depends on (``TokenPolicy.verdict_key``), so
        after a reload known tokens are not checked again (every keep-alive connection
        identifies again under the new config)."""
        self.verdicts = old.verdicts
        self._tokens, self._key = old._tokens, old._key

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

    def identify_now(self, address: str, authorization: bytes | None,
                     cert_subject: str | None = None) -> Identity | PendingCheck | PendingKeys:
        """``identify`` with token signature checks run at once, on the caller's thread (for
        callers outside the event loop: commands, tests)."""
        for _ in range(len(self.clients) + 1):
            result = self.identify(address, authorization, cert_subject)
            if not isinstance(result, PendingTokenCheck):
                return result
            if not result.run() and result.policy.verdict_key not in result.verified:
                raise result.error
        raise AuthRequired("token not verified", reason="token_malformed")

    def identify(self, address: str, authorization: bytes | None,
                 cert_subject: str | None = None) -> Identity | PendingCheck | PendingKeys | PendingTokenCheck:
        if authorization and self.token_users:
            token = _token_credentials(authorization, self.token_users)
            if token is not None:
                return self._identify_token(address, *token)
        creds = _basic_credentials(authorization) if authorization else None
        wanted_credentials = False
        for client in self.candidates(address):
            if client.token is not None:
                wanted_credentials = True  # (a token was handled above)
                continue
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

    def _identify_token(self, address: str, user: str | None, token: str) -> Identity | PendingKeys | PendingTokenCheck:
        """The entry a service-account token identifies (see the module docstring). A token seen
        before costs a keyed digest and a lookup: nothing is parsed again until it expires. A
        refusal carries what the token claims (``AuthRequired.claimed``, unverified)."""
        try:
            return self._token_identity(address, user, token)
        except AuthRequired as err:
            if err.claimed is None and err.reason.startswith("token_"):
                err.claimed = claimed(token)
            raise

    def _token_identity(self, address: str, user: str | None, token: str) -> Identity | PendingKeys | PendingTokenCheck:
        entries = [c for c in self.candidates(address) if c.token is not None]
        if not entries:
            raise PolicyDenied("no client rule admits service-account tokens from this address",
                               reason="client_not_allowed")
        digest = hmac.digest(self._key, token.encode(), "sha256")
        known = self._tokens.get(digest)
        if known is None:
            known = (peek(token)[1], {})
            if len(self._tokens) >= MAX_REMEMBERED_TOKENS:
                self._tokens.pop(next(iter(self._tokens)), None)  # the oldest: one at a time
            self._tokens[digest] = known
        issuer, verified = known
        base, _, profile = (user or "").partition("+")
        entries = [c for c in entries if c.token.issuer == issuer and (user is None or c.token.username == base)]
        if not entries:
            raise AuthRequired("token issuer not accepted", reason="token_unknown_issuer")
        refused: AuthRequired | None = None  # the first entry's refusal, if no entry verifies it
        seen: TokenSubject | None = None  # a verified subject no entry admits
        for client in entries:  # the first entry that verifies the token and lists its account wins
            subject = verified.get(client.token.verdict_key)
            if isinstance(subject, AuthRequired):  # refused before for good: a job retrying an expired
                # token costs a lookup (and a new error: re-raising the kept one would grow its traceback)
                refused = refused or AuthRequired(subject.detail, reason=subject.reason)
                continue
            if subject is None or subject.expires + client.token.leeway <= self._clock():
                try:
                    subject = self._token_subject(client.token, token, digest, verified)
                except AuthRequired as err:
                    if err.reason in FINAL_TOKEN_REFUSALS:  # (a copy: the raised one carries a traceback,
                        # and with it every frame's locals up to the handler: connections, heads)
                        verified[client.token.verdict_key] = AuthRequired(err.detail, reason=err.reason)
                    refused = refused or err
                    continue
                return subject  # (keys to fetch, or the signature to check: then asked again)
            if client.token.admits(subject):
                return Identity(client, profile or None, subject)
            seen = subject
        if seen is None and refused is not None:
            raise refused
        raise AuthRequired("service account not allowed", reason="service_account_not_allowed",
                           user=seen.name[:USER_LIMIT] if seen is not None else None)

    def _token_subject(self, policy: TokenPolicy, token: str, digest: bytes,
                       verified: dict) -> PendingTokenCheck | PendingKeys:
        """The signature check of ``token`` for ``policy`` once the cheap checks pass with the
        keys in hand, or the keys to fetch first; raises the cheap checks' 407 (before any key
        is looked up or fetched: an expired token never makes the gateway fetch keys)."""
        precheck(token, policy, self._clock())
        keys = policy.static_keys if policy.static_keys is not None else self.keys.keys(policy)
        if keys is None:
            error = AuthRequired("the issuer's keys are not available", reason="token_keys_unavailable")
            wait = self.keys.refresh(policy)
            if wait is None:
                raise error
            return PendingKeys(wait, error)
        try:
            key = signing_key(token, keys)
        except UnknownKey as err:
            wait = None if policy.static_keys is not None else self.keys.refresh(policy)
            if wait is None:
                raise
            return PendingKeys(wait, err)
        return PendingTokenCheck(digest + id(policy).to_bytes(8, "little"), token, policy, key, verified)

    def _check(self, client: ClientPolicy, user: str, password: str) -> bool | PendingCheck:
        if client.password_plain is not None:
            return hmac.compare_digest(password.encode(), client.password_plain.encode())
        encoded = client.password_hash or ""
        key = self.verdicts.key(encoded, password)
        known = self.verdicts.get(key)
        if known is not None:
            return known
        return PendingCheck(key, password, encoded, self.verdicts, user)


def rejected(user: str, reason: str) -> AuthRequired:
    """The 407 for credentials that do not match: the same detail whatever the reason."""
    return AuthRequired(REJECTED, reason=reason, user=user if len(user) <= USER_LIMIT else user[:USER_LIMIT] + "...")


def _token_credentials(value: bytes, users: frozenset[str]) -> tuple[str | None, str] | None:
    """(user, token) for ``Bearer TOKEN`` (no user) or Basic with a token user name (``k8s``
    or ``k8s+PROFILE``); None for any other credentials."""
    scheme, _, rest = value.strip().partition(b" ")
    scheme = scheme.lower()
    if scheme == b"bearer":
        try:
            token = rest.strip().decode("ascii")
        except UnicodeDecodeError:
            raise AuthRequired("malformed token: not ASCII", reason="token_malformed") from None
        if not looks_like_token(token):
            raise AuthRequired("malformed token: not a JWT", reason="token_malformed")
        return None, token
    if scheme != b"basic":
        return None
    try:
        user, password = _basic_credentials(value)
    except AuthRequired:
        return None
    if user.partition("+")[0] not in users:
        return None
    if not looks_like_token(password):
        raise AuthRequired("malformed token: not a JWT", reason="token_malformed", user=user[:USER_LIMIT])
    return user, password


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


def compile_token(spec, jwks_of: Callable[[str, float], object]) -> TokenPolicy:
    """A ``KubernetesConfig`` compiled; ``jwks_of(path, min_refresh)`` reads its jwks_file (I/O
    with the caller: the mapping it returns may re-read the file when a key is missing)."""
    return TokenPolicy(
        issuer=spec.issuer, audiences=tuple(spec.audiences), accounts=tuple(spec.service_accounts),
        username=spec.username, leeway=spec.leeway, source=spec.jwks_url or spec.issuer, ca_file=spec.ca_file,
        refresh=spec.refresh, min_refresh=spec.min_refresh,
        static_keys=jwks_of(spec.jwks_file, spec.min_refresh) if spec.jwks_file else None)


def compile_clients(specs: Sequence[object], secret_of: Callable[[object], str | None],
                    jwks_of: Callable[[str], object] | None = None) -> ClientRegistry:
    """Build the registry from ``ClientConfig``-shaped objects; ``secret_of`` reads a client's
    password_file / password_env, ``jwks_of`` a kubernetes jwks_file (I/O stays with the caller)."""
    out = []
    for spec in specs:
        k8s = getattr(spec, "kubernetes", None)
        nets = None if spec.from_ is None else tuple(ipaddress.ip_network(n) for n in spec.from_)
        out.append(ClientPolicy(
            name=spec.name, nets=nets, username=spec.username, password_hash=spec.password_hash,
            password_plain=secret_of(spec), cert_subject=spec.cert_subject, profiles=tuple(spec.egress),
            allow=None if spec.allow is None else RuleSet(spec.allow), deny=RuleSet(spec.deny),
            report_only=spec.mode == "report", max_connections=spec.max_connections,
            max_new_per_second=spec.max_new_per_second,
            token=None if k8s is None else compile_token(k8s, jwks_of or (lambda path, min_refresh: {})),
            allow_patterns=None if spec.allow is None else tuple(spec.allow), deny_patterns=tuple(spec.deny)))
    return ClientRegistry(out)
