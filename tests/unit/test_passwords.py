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
