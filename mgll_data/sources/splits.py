"""Splits chosen by a stable hash of an id (a patient, an image), for releases without lists."""

from __future__ import annotations

import hashlib


def hash_fraction(key: str, salt: str) -> float:
    """A number in [0, 1) fixed by `salt` and `key`: SHA-256, never Python's salted hash()."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_split(key: str, salt: str, validation: float, test: float) -> str:
    """`test` for the first `test` share of keys, `validation` for the next, else `train`."""
    u = hash_fraction(key, salt)
    if u < test:
        return "test"
    if u < test + validation:
        return "validation"
    return "train"
