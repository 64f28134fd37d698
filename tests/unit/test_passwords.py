"""policy/passwords.py: scrypt hash/verify."""

from __future__ import annotations

import pytest

from egressgate.policy.passwords import hash_password, verify_password


@pytest.fixture(scope="module")
def encoded() -> str:
    return hash_password("correct horse ☃")


def test_roundtrip(encoded: str) -> None:
    assert verify_password("correct horse ☃", encoded) is True


def test_format(encoded: str) -> None:
    scheme, n, r, p, salt, digest = encoded.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert salt and digest
    assert "correct horse" not in encoded


def test_salted() -> None:
    assert hash_password("same") != hash_password("same")


@pytest.mark.parametrize("wrong", ["correct horse", "correct horse ☃ ", "", "CORRECT HORSE ☃"])
def test_wrong_password(encoded: str, wrong: str) -> None:
    assert verify_password(wrong, encoded) is False


GARBAGE = [
    "",
    "scrypt",
    "not-a-hash",
    "md5$16384$8$1$c2FsdA==$aGFzaA==",
    "scrypt$16384$8$1$c2FsdA==",  # one field short
    "scrypt$16384$8$1$c2FsdA==$aGFzaA==$extra",
    "scrypt$x$8$1$c2FsdA==$aGFzaA==",
    "scrypt$16384$8$1$***$aGFzaA==",
    "scrypt$16384$8$1$c2FsdA==$***",
    "scrypt$3$8$1$c2FsdA==$aGFzaA==",  # N not a power of two
    "scrypt$16384$8$1$c2FsdA==$aGFzaA==",  # well formed, wrong digest
]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_hash_is_false_not_an_exception(garbage: str) -> None:
    assert verify_password("anything", garbage) is False


def test_tampered_hash(encoded: str) -> None:
    head, digest = encoded.rsplit("$", 1)
    flipped = ("B" if digest[0] != "B" else "C") + digest[1:]
    assert verify_password("correct horse ☃", f"{head}${flipped}") is False


def _forge(password: str, n: int = 2**14, r: int = 8, p: int = 1, salt: bytes = b"s" * 16, dklen: int = 32) -> str:
    import base64
    import hashlib

    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=dklen)
    return f"scrypt${n}${r}${p}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


WEAK = [  # (label, hash of "pw" that verify_password used to accept, message fragment from the model)
    ("one-byte digest", _forge("pw", dklen=1), "digest must be 32 bytes"),
    ("truncated digest", _forge("pw", dklen=16), "digest must be 32 bytes"),
    ("N=2", _forge("pw", n=2), "power of two of at least 16384"),
    ("N=1024", _forge("pw", n=1024), "power of two of at least 16384"),
    ("short salt", _forge("pw", salt=b"salt"), "salt must be at least 16 bytes"),
    ("p=0", "scrypt$16384$8$0$" + _forge("pw").split("$", 5)[4] + "$" + _forge("pw").split("$", 5)[5], "p must be"),
    ("non-base64 salt", _forge("pw").replace("$c3Nz", "$c3Nz!", 1), "salt is not valid base64"),
]


@pytest.mark.parametrize(("label", "weak", "message"), WEAK, ids=[w[0] for w in WEAK])
def test_weak_or_malformed_hashes_never_verify(label: str, weak: str, message: str) -> None:
    from egressgate.model import ScryptHash

    with pytest.raises(ValueError, match=message):
        ScryptHash.parse(weak)
    assert verify_password("pw", weak) is False


def test_one_byte_digest_no_longer_accepts_one_password_in_256() -> None:
    """The defect: a 1-byte stored digest accepted ~1/256 of random passwords."""
    weak = _forge("the-real-one", dklen=1)
    accepted = sum(verify_password(f"guess-{i}", weak) for i in range(600))
    assert accepted == 0
