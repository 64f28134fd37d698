"""Kubernetes service-account tokens (projected, audience-bound JWTs), verified offline. Pure:
the key set is passed in; fetching it is ``egressgate.services.keysource``'s job.

JWS and the registered claims are PyJWT's (``jwt.decode``), never hand-rolled: the signature
with a key bound to its algorithm (a ``PyJWK`` from the issuer's JWKS; the token's ``alg``
must equal the key's), only asymmetric algorithms accepted (``none`` and every HMAC are
refused before any key is touched, and symmetric ``oct`` keys never enter a key set), then
``iss``, ``aud``, ``exp``/``nbf``/``iat`` with a small leeway. Then the ``kubernetes.io``
claims: namespace, service account (agreeing with ``sub``), and the pod if the token is bound
to one.

Cheap checks first (``prepare``): the shape, the algorithm, and the unverified ``iss``,
``aud``, ``exp``, ``nbf``/``iat`` and required claims are judged before any key is looked up or
signature checked, so an expired or misaddressed token costs no signature check and never a
key fetch; a token they pass is refused only once verified (``verify_signature``, the
expensive step, which the caller may run off the event loop). Acceptance rests on the verified
claims alone: ``verify_signature`` judges them all again.

Every failure is an ``AuthRequired`` (407) whose reason names it (``token_expired``,
``token_wrong_audience``, ...) and whose detail says what was wrong without echoing the token
or any claim. ``UnknownKey`` (a ``kid`` the key set lacks) is the one the caller may cure by
fetching the keys again.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import jwt

from ..errors import AuthRequired

MAX_TOKEN_BYTES = 16384  # a Kubernetes token is about 1 KiB; anything much larger is refused unread
MAX_KEYS = 64  # keys kept from one JWKS document
MIN_RSA_BITS = 2048
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
_SIGNING_KTY = {"RSA", "EC"}


class UnknownKey(AuthRequired):
    reason = "token_unknown_key"


@dataclass(frozen=True, slots=True)
class TokenSubject:
    """Who a verified token speaks for."""

    namespace: str
    service_account: str
    pod: str | None
    issuer: str
    expires: float  # the token's ``exp`` (seconds since the epoch)

    @property
    def name(self) -> str:
        return f"{self.namespace}/{self.service_account}"


@dataclass(frozen=True, slots=True, eq=False)
class TokenPolicy:
    """A client entry's ``kubernetes`` block, compiled."""

    issuer: str
    audiences: tuple[str, ...]
    accounts: tuple[str, ...]  # "namespace/name" or "namespace/*"
    username: str = "k8s"  # the Basic user name that marks the password as a token
    leeway: float = 30.0
    source: str = ""  # where the keys come from: the JWKS URL, or the issuer (OIDC discovery)
    ca_file: str | None = None
    refresh: float = 3600.0
    min_refresh: float = 10.0
    static_keys: Mapping[str, Any] | None = None  # from jwks_file: never fetched

    @property
    def verdict_key(self) -> tuple:
        """What a token's verdict for this policy depends on (the accounts list does not: it is
        judged on every use): equal across reloads while these are unchanged, so a reloaded
        registry keeps the verdicts (a re-read ``jwks_file`` is a new key set: checked again)."""
        return (self.issuer, self.audiences, self.leeway, self.source, id(self.static_keys))

    def admits(self, subject: TokenSubject) -> bool:
        return self.admits_name(subject.name)

    def admits_name(self, name: str) -> bool:
        """``namespace/serviceaccount`` is in the list (by name, or by ``namespace/*``)."""
        return any(name == a or (a.endswith("/*") and fnmatch.fnmatchcase(name, a)) for a in self.accounts)


class KeyProvider(Protocol):
    """The current keys of a policy's issuer (``keys``, None while never fetched), and a fetch
    of them to await (``refresh``, None when one is not allowed now: rate-limited)."""

    def keys(self, policy: TokenPolicy) -> Mapping[str, Any] | None: ...

    def refresh(self, policy: TokenPolicy) -> Callable[[], Awaitable[None]] | None: ...


class NoKeys:
    """The provider outside a running gateway (check-config, explain): nothing fetched."""

    def keys(self, policy: TokenPolicy) -> Mapping[str, Any] | None:
        return None

    def refresh(self, policy: TokenPolicy) -> Callable[[], Awaitable[None]] | None:
        return None


def parse_jwks(doc: object) -> dict[str, jwt.PyJWK]:
    """The signing keys of a JWKS document by ``kid``; keys that are not asymmetric signing
    keys of a supported algorithm (RSA of at least ``MIN_RSA_BITS``) are left out. ValueError when nothing usable is left."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    out: dict[str, jwt.PyJWK] = {}
    for item in doc["keys"][:MAX_KEYS]:
        if not isinstance(item, dict) or item.get("kty") not in _SIGNING_KTY or item.get("use", "sig") != "sig":
            continue
        if item.get("alg") is not None and item.get("alg") not in ALGORITHMS:
            continue
        try:
            key = jwt.PyJWK(item)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            continue
        if item["kty"] == "RSA" and getattr(key.key, "key_size", 0) < MIN_RSA_BITS:
            continue  # too weak to trust
        out[str(item.get("kid", ""))] = key
    if not out:
        raise ValueError("the JWKS document holds no usable RSA or EC signing key")
    return out


def looks_like_token(secret: str) -> bool:
    return secret.count(".") == 2


def malformed(detail: str) -> AuthRequired:
    return AuthRequired(f"malformed token: {detail}", reason="token_malformed")


def _segment(text: str) -> dict:
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def peek(token: str) -> tuple[str, str]:
    """(``kid``, ``iss``) read before verification, only to pick the entry and the key (PyJWT
    verifies everything afterwards); raises 407 when the token is not a well-formed JWT signed
    with an accepted algorithm."""
    if len(token) > MAX_TOKEN_BYTES:
        raise malformed(f"longer than {MAX_TOKEN_BYTES} bytes")
    parts = token.split(".")
    try:
        if len(parts) != 3:
            raise ValueError("not three segments")
        header, claims = _segment(parts[0]), _segment(parts[1])
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError):
        raise malformed("not a signed JWT") from None
    if header.get("alg") not in ALGORITHMS:
        raise AuthRequired("token algorithm not accepted (RS*, PS* or ES* only)", reason="token_bad_algorithm")
    iss = claims.get("iss")
    if not isinstance(iss, str):
        raise malformed("no issuer")
    kid = header.get("kid", "")
    if not isinstance(kid, str):
        raise malformed("key id is not a string")
    return kid, iss


CLAIM_LIMIT = 253  # the longest Kubernetes name; a claimed value is cut there


def claimed(token: str) -> dict[str, str] | None:
    """What a token *claims* about its job, read without verifying anything: the service
    account (``namespace/name``), the pod's name and uid, the issuer. For the access record of a
    refused token, marked there as unverified, so an expired or misaddressed token can still be
    traced to a job; never the token itself. None when it claims none of these."""
    parts = token.split(".")
    if len(token) > MAX_TOKEN_BYTES or len(parts) != 3:
        return None
    try:
        claims = _segment(parts[1])
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError):
        return None

    def text(value: object) -> str | None:
        if not isinstance(value, str) or not value:
            return None
        return "".join(c if c.isprintable() else "?" for c in value[:CLAIM_LIMIT])

    k8s = claims.get("kubernetes.io")
    k8s = k8s if isinstance(k8s, dict) else {}
    sa = k8s.get("serviceaccount") if isinstance(k8s.get("serviceaccount"), dict) else {}
    pod = k8s.get("pod") if isinstance(k8s.get("pod"), dict) else {}
    ns, name = text(k8s.get("namespace")), text(sa.get("name"))
    found = {"serviceaccount": f"{ns}/{name}" if ns and name else None, "pod": text(pod.get("name")),
             "pod_uid": text(pod.get("uid")), "issuer": text(claims.get("iss"))}
    found = {k: v for k, v in found.items() if v is not None}
    return found if set(found) - {"issuer"} else None


_ERRORS: tuple[tuple[type[Exception], str, str], ...] = (
    (jwt.ExpiredSignatureError, "token_expired", "token expired"),
    (jwt.ImmatureSignatureError, "token_not_yet_valid", "token not yet valid (nbf or iat in the future)"),
    (jwt.InvalidAudienceError, "token_wrong_audience", "token audience not accepted"),
    (jwt.InvalidIssuerError, "token_unknown_issuer", "token issuer not accepted"),
    (jwt.InvalidSignatureError, "token_bad_signature", "token signature does not verify"),
    (jwt.InvalidAlgorithmError, "token_bad_algorithm", "token algorithm does not match its key"),
    (jwt.MissingRequiredClaimError, "token_malformed", "malformed token: a required claim is missing"),
)


def precheck(token: str, policy: TokenPolicy, now: float) -> None:
    """Refuse, from the token's *unverified* claims, what no signature could make acceptable:
    another issuer, none of the accepted audiences, expired, not yet valid, a required claim
    missing. Only refusals: nothing is accepted on these claims."""
    try:
        claims = _segment(token.split(".")[1])
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError, IndexError):
        raise malformed("not a signed JWT") from None
    for name in ("exp", "iat", "iss", "aud", "sub"):
        if claims.get(name) is None:
            raise AuthRequired("malformed token: a required claim is missing", reason="token_malformed")
    if claims["iss"] != policy.issuer:
        raise AuthRequired("token issuer not accepted", reason="token_unknown_issuer")
    aud = claims["aud"]
    auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if not any(isinstance(a, str) and a in policy.audiences for a in auds):
        raise AuthRequired("token audience not accepted", reason="token_wrong_audience")
    times = {name: claims.get(name) for name in ("exp", "nbf", "iat")}
    if any(v is not None and (isinstance(v, bool) or not isinstance(v, int | float)) for v in times.values()):
        raise malformed("claims do not validate")
    if times["exp"] <= now - policy.leeway:
        raise AuthRequired("token expired", reason="token_expired")
    if any(v is not None and v > now + policy.leeway for v in (times["nbf"], times["iat"])):
        raise AuthRequired("token not yet valid (nbf or iat in the future)", reason="token_not_yet_valid")


def signing_key(token: str, keys: Mapping[str, Any]) -> Any:
    """The key ``token`` names (its ``kid``) in ``keys``, or ``UnknownKey``."""
    kid, _ = peek(token)
    key = keys.get(kid)
    if key is None:
        err = UnknownKey("token signed with a key the issuer does not publish", reason="token_unknown_key")
        err.claimed = claimed(token)  # (the error may be raised later, once fetched keys still lack it)
        raise err
    return key


def verify_signature(token: str, policy: TokenPolicy, key: Any) -> TokenSubject:
    """The expensive step: the signature with ``key``, then every claim judged again (verified)."""
    try:
        claims = jwt.decode(token, key=key, algorithms=list(ALGORITHMS), audience=list(policy.audiences),
                            issuer=policy.issuer, leeway=policy.leeway,
                            options={"require": ["exp", "iat", "iss", "aud", "sub"], "strict_aud": False})
    except jwt.PyJWTError as exc:
        for kind, reason, detail in _ERRORS:
            if isinstance(exc, kind):
                raise AuthRequired(detail, reason=reason) from None
        raise malformed("claims do not validate") from None
    return _subject(claims)


def verify(token: str, policy: TokenPolicy, keys: Mapping[str, Any], now: float | None = None) -> TokenSubject:
    """The subject of a valid token for ``policy``, or a 407 saying what is wrong."""
    peek(token)
    precheck(token, policy, time.time() if now is None else now)
    return verify_signature(token, policy, signing_key(token, keys))


def _subject(claims: dict) -> TokenSubject:
    k8s = claims.get("kubernetes.io")
    if not isinstance(k8s, dict):
        raise malformed("no kubernetes.io claims (not a service-account token)")
    ns = k8s.get("namespace")
    sa = k8s.get("serviceaccount")
    name = sa.get("name") if isinstance(sa, dict) else None
    if not isinstance(ns, str) or not isinstance(name, str) or not ns or not name:
        raise malformed("kubernetes.io claims lack the namespace or service account")
    if claims.get("sub") != f"system:serviceaccount:{ns}:{name}":
        raise malformed("sub does not name the service account of the kubernetes.io claims")
    pod = k8s.get("pod")
    pod_name = pod.get("name") if isinstance(pod, dict) and isinstance(pod.get("name"), str) else None
    exp = claims["exp"]
    return TokenSubject(ns[:253], name[:253], pod_name[:253] if pod_name else None, str(claims["iss"]), float(exp))
