"""Password hashes for proxy credentials: scrypt from the standard library (memory-hard),
encoded as ``scrypt$N$r$p$salt$hash`` (base64), compared in constant time. The stored form is
validated by ``model.ScryptHash`` (the config loader refuses anything else)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from ..model import ScryptHash

_N, _R, _P = 2**14, 8, 1
_DKLEN = ScryptHash.DIGEST_BYTES


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=_DKLEN)
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """False for a wrong password and for any stored value that is not a valid hash."""
    try:
        stored = ScryptHash.parse(encoded)
        actual = hashlib.scrypt(password.encode(), salt=stored.salt, n=stored.n, r=stored.r, p=stored.p,
                                dklen=len(stored.digest), maxmem=2 * ScryptHash.MAX_MEMORY)
    except (ValueError, TypeError, MemoryError):
        return False
    return hmac.compare_digest(actual, stored.digest)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
