"""Label names across files, which labels a source annotates, and the label vectors the loss sees.

Label names come from each file's `mgll` metadata block (read with
`mgll_data.record.read_mgll_metadata`). Several datasets are aligned onto the union of their
names (the first file's order, then new names appended); a label a file does not carry is NaN
(not annotated) in its rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mgll_data.record import NEGATIVE, POSITIVE, UNCERTAIN, read_mgll_metadata

from ..errors import UserError

UncertainPolicy = Literal["ignore", "positive", "negative"]
UnmentionedPolicy = Literal["negative", "ignore"]
# The values of --uncertain and --unmentioned (fit and eval).
UNCERTAIN_POLICIES: tuple[UncertainPolicy, ...] = ("ignore", "positive", "negative")
UNMENTIONED_POLICIES: tuple[UnmentionedPolicy, ...] = ("negative", "ignore")


def shard_metadata(path: Path | str) -> dict[str, Any]:
    """The `mgll` block of a user's file; a file that is not an mgll shard is a `UserError`."""
    try:
        return read_mgll_metadata(path)
    except ValueError as err:  # no block or no label_names, or pyarrow: not Parquet at all
        message = str(err)
        raise UserError(message if str(path) in message else f"{path}: {message}") from err


def aligned_label_names(
    files: Sequence[Path | str],
) -> tuple[list[str], dict[Path, np.ndarray]]:
    """The union of the files' label names and, per file, where each union label sits.

    Order: the first file's names, then names new in later files appended in their order.
    ``index_maps[file][j]`` is the position of union label ``j`` in that file's vector, or −1
    when the file does not carry it (its rows get NaN there: not annotated).
    """
    names: list[str] = []
    seen: set[str] = set()
    per_file: dict[Path, list[str]] = {}
    for file in files:
        file_names = list(shard_metadata(file)["label_names"])
        per_file[Path(file)] = file_names
        for name in file_names:
            if name not in seen:
                seen.add(name)
                names.append(name)
    index_maps = {}
    for file, file_names in per_file.items():
        position = {name: i for i, name in enumerate(file_names)}
        index_maps[file] = np.array([position.get(n, -1) for n in names], dtype=np.int64)
    return names, index_maps


def annotated_mask(metadata: dict[str, Any], label_names: Sequence[str]) -> np.ndarray:
    """Bool ``[K]``: which of ``label_names`` the file's source annotates.

    Files without ``annotated_labels`` count as annotating every label they carry.
    """
    annotated = set(metadata.get("annotated_labels", metadata["label_names"]))
    return np.array([name in annotated for name in label_names], dtype=bool)


def apply_label_policy(
    labels: np.ndarray,
    annotated: np.ndarray,
    uncertain: UncertainPolicy = "ignore",
    unmentioned: UnmentionedPolicy = "negative",
) -> np.ndarray:
    """The label vector the loss sees (the `--uncertain`/`--unmentioned` policy), as float32.

    ``uncertain``: −1 → NaN (``ignore``), 1 (``positive``) or 0 (``negative``).
    ``unmentioned``: a NaN stored for a label in ``annotated`` → 0 (``negative``) or stays NaN
    (``ignore``). NaN for labels not annotated always stays NaN. The two rules look at the stored
    values, so an uncertain label ignored as NaN is never turned into a negative.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be ignore|positive|negative, not {uncertain}")
    if unmentioned not in UNMENTIONED_POLICIES:
        raise ValueError(f"unmentioned must be negative|ignore, not {unmentioned}")
    stored = np.asarray(labels, dtype=np.float32)
    out = stored.copy()
    becomes = {"ignore": np.nan, "positive": POSITIVE, "negative": NEGATIVE}[uncertain]
    out[stored == UNCERTAIN] = becomes
    if unmentioned == "negative":
        out[np.isnan(stored) & annotated] = NEGATIVE
    return out
