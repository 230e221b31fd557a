"""Splits chosen by a stable hash of an id (a patient, an image), for releases without lists."""

from __future__ import annotations

import hashlib

from ..build.pipeline import SplitConfig


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


def carve_validation(key: str, splits: SplitConfig, *, carve_test: bool = False) -> str:
    """The split of a row from a release's train split whose release has no validation split.

    A seeded share (`splits.validation_fraction`, salted by `splits.hash_salt`) of the train keys
    becomes validation so that training can be monitored; `key` is the patient where the release
    names one, so that a patient's images never straddle train and validation. `carve_test` also
    carves `splits.test_fraction` as test, for a release whose test split may be absent.
    """
    test = splits.test_fraction if carve_test else 0.0
    return hash_split(key, splits.hash_salt, splits.validation_fraction, test)
