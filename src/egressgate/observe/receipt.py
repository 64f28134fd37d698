"""Job receipts: the document (from ``observe.tally`` exports added up), and its Ed25519 signature.

A signed receipt is one JSON object::

    {"receipt": {...}, "signature": {"algorithm": "Ed25519", "key_id": "ed25519:...",
                                     "public_key": BASE64, "value": BASE64}}

The signature is over the receipt's canonical form: the ``receipt`` object as JSON with keys
sorted, no whitespace (``separators=(",", ":")``), UTF-8, non-ASCII characters as they are
(``canonical``). ``public_key`` and ``value`` are standard base64 of the raw 32-byte public key
and the 64-byte signature; ``key_id`` is ``ed25519:`` and the first 16 hex digits of the SHA-256
of the raw public key. A verifier pins the gateway's public key (``/status`` shows it,
``egressgate receipt public-key`` prints it); the copy inside the receipt only says which key
signed it.

Nothing here reads files or sockets: keys come in as bytes or text (``receiptdesk`` reads them).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..model import iso8601

ALGORITHM = "Ed25519"
VERSION = 1
SCOPE_INSTANCE = ("this gateway instance only (every worker process of it): no fleet store is configured, so "
                  "traffic this job sent through other instances behind the same load balancer is not included")


def canonical(receipt: dict) -> bytes:
    return json.dumps(receipt, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_text(key: Ed25519PublicKey) -> str:
    return base64.b64encode(raw_public(key)).decode("ascii")


def key_id(key: Ed25519PublicKey) -> str:
    return "ed25519:" + hashlib.sha256(raw_public(key)).hexdigest()[:16]


def private_from_pem(data: bytes) -> Ed25519PrivateKey:
    """An Ed25519 private key in PEM (PKCS #8: ``openssl genpkey -algorithm ed25519``); ValueError
    naming what is wrong otherwise."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"a {type(key).__name__.removeprefix('_')} key, not Ed25519 "
                         "(make one with `openssl genpkey -algorithm ed25519`)")
    return key


def private_to_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_from_text(text: str) -> Ed25519PublicKey:
    """A public key as base64 of its 32 raw bytes (as /status shows it) or in PEM; ValueError else."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode())
        except ValueError as exc:
            raise ValueError(f"not a PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, this is {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def sign(receipt: dict, key: Ed25519PrivateKey) -> dict:
    public = key.public_key()
    return {"receipt": receipt,
            "signature": {"algorithm": ALGORITHM, "key_id": key_id(public), "public_key": public_text(public),
                          "value": base64.b64encode(key.sign(canonical(receipt))).decode("ascii")}}


def verify(doc: object, pinned: Ed25519PublicKey | None = None) -> tuple[bool, str]:
    """(valid, why). ``pinned``: the gateway's public key as the verifier knows it; without it the
    key inside the document is used (that proves the receipt is intact, not who signed it)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("receipt"), dict) or not isinstance(doc.get("signature"), dict):
        return False, "not a signed receipt (expected {\"receipt\": {...}, \"signature\": {...}})"
    sig = doc["signature"]
    if sig.get("algorithm") != ALGORITHM:
        return False, f"unsupported signature algorithm {sig.get('algorithm')!r}"
    try:
        embedded = public_from_text(str(sig.get("public_key", "")))
        value = base64.b64decode(str(sig.get("value", "")), validate=True)
    except (ValueError, binascii.Error) as exc:
        return False, f"malformed signature: {exc}"
    key = pinned or embedded
    if pinned is not None and raw_public(pinned) != raw_public(embedded):
        return False, f"signed by another key ({key_id(embedded)}), not the pinned {key_id(pinned)}"
    try:
        key.verify(value, canonical(doc["receipt"]))
    except InvalidSignature:
        return False, "the signature does not match the receipt: it was changed after signing, or signed by another key"
    return True, f"valid, signed by {key_id(key)}" + ("" if pinned is not None else " (the key in the receipt: "
                                                       "pin the gateway's with --public-key to prove who signed it)")


def build(merged: dict, subject: dict, issued_at: float, since: float | None, covers: dict, gateway: dict,
          provider_of: Callable[[str, str], str | None]) -> dict:
    """The receipt document from ``tally.merge``d exports. ``provider_of(profile, destination)``:
    the configured provider whose URL names that destination, if any."""
    destinations = []
    totals = {"requests": 0, "tunnels": 0, "bytes_up": 0, "bytes_down": 0, "refusals": 0, "holds_met": 0}
    for d in merged["destinations"]:
        destinations.append({**d, "provider": provider_of(d["profile"], d["destination"]),
                             "first_iso": iso8601(d["first"]), "last_iso": iso8601(d["last"])})
        for k in ("requests", "tunnels", "bytes_up", "bytes_down", "holds_met"):
            totals[k] += d[k]
        totals["refusals"] += sum(d["refusals"].values())
    identities = merged["identities"]
    first = min((i["first"] for i in identities), default=None)
    last = max((i["last"] for i in identities), default=None)
    egress = merged["egress"]
    window = {"first": first, "last": last, "since": since, "counted_from": merged["counted_from"]}
    for name in list(window):
        if window[name] is not None:
            window[f"{name}_iso"] = iso8601(window[name])
    return {
        "version": VERSION,
        "subject": subject,
        "identities": identities,
        "issued_at": round(issued_at, 3), "issued_at_iso": iso8601(issued_at),
        "window": window,
        "egress_ips": sorted({e["egress_ip"] for e in egress if e["egress_ip"]}),
        "egress": egress,
        "destinations": destinations,
        "totals": totals,
        "covers": {**covers, "folded_into_other": sum(i["folded"] for i in identities),
                   "identities_dropped": {"expired": merged["expired"], "evicted": merged["evicted"]}},
        "gateway": gateway,
    }
