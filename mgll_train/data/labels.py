"""Label names across files, which labels a source annotates, and the label vectors the loss sees.

Label names come from each file's `mgll` metadata block (read with
`mgll_data.record.read_mgll_metadata`). Several datasets are aligned onto the union of their
names (the first file's order, then new names appended); a label a file does not carry is NaN
(not annotated) in its rows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mgll_data.record import LABEL_VALUES, NEGATIVE, POSITIVE, UNCERTAIN, read_mgll_metadata

# The values of --uncertain and --unmentioned live in a torch-free module the parsers read.
from ..choices import UNCERTAIN_POLICIES, UNMENTIONED_POLICIES, UncertainPolicy, UnmentionedPolicy
from ..errors import UserError

log = logging.getLogger("mgll_train")


def shard_metadata(path: Path | str) -> dict[str, Any]:
    """The `mgll` block of a user's file; a file that is not an mgll shard is a `UserError`."""
    try:
        return read_mgll_metadata(path)
    except ValueError as err:  # no block or no label_names, or pyarrow: not Parquet at all
        message = str(err)
        raise UserError(message if str(path) in message else f"{path}: {message}") from err


def check_stored_labels(path: Path | str, label_names: Sequence[str]) -> int:
    """Check every stored label vector of a file; return how many values are annotated (not NaN).

    Each vector must have one value per name in the file's `mgll` metadata, each 1, 0, −1 or
    NaN; anything else is a `UserError` naming the file and the first offending row. Checked a
    Parquet batch at a time with vectorised pyarrow/NumPy operations.
    """
    annotated, offset = 0, 0
    parquet = pq.ParquetFile(path)
    if "labels" not in parquet.schema_arrow.names:
        raise UserError(f"{path}: no labels column; expected the columns of an mgll build")
    for batch in parquet.iter_batches(columns=["labels"]):
        column = batch.column(0)
        lengths = pc.fill_null(pc.list_value_length(column), -1).to_numpy()
        wrong = np.flatnonzero(lengths != len(label_names))
        if len(wrong):
            row = int(wrong[0])
            raise UserError(
                f"{path}: the labels of record {_record_id(parquet, offset + row)} hold "
                f"{max(int(lengths[row]), 0)} values; expected {len(label_names)}, one per "
                "label_names entry of its mgll metadata"
            )
        values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float64)
        known = np.isnan(values) | np.isin(values, LABEL_VALUES)
        if not known.all():
            bad = int(np.flatnonzero(~known)[0])
            row = offset + int(np.searchsorted(np.cumsum(lengths), bad, side="right"))
            raise UserError(
                f"{path}: record {_record_id(parquet, row)} has the label value "
                f"{values[bad]:g}; expected 1 (positive), 0 (negative), -1 (uncertain) or NaN "
                "(not mentioned)"
            )
        annotated += int((~np.isnan(values)).sum())
        offset += batch.num_rows
    return annotated


def _record_id(parquet: pq.ParquetFile, row: int) -> str:
    """The id of row ``row`` of a file (read only for an error message), or ``row N``."""
    if "id" not in parquet.schema_arrow.names:
        return f"row {row}"
    return str(parquet.read(columns=["id"])["id"][row])


def check_annotated(spec: str, annotated_values: int, required: bool) -> None:
    """Refuse data whose every stored label is NaN when labels are ``required`` (they are the
    MGLL losses' targets and the evaluation's ground truth); otherwise warn once."""
    if annotated_values:
        return
    message = f"{spec}: every stored label is NaN (nothing annotated)"
    if required:
        raise UserError(
            f"{message}; the MGLL losses and evaluation learn from labels "
            "(--loss clip trains on the texts alone)"
        )
    log.warning("%s: --loss clip trains on the texts alone; label metrics will be empty", message)


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


_UNCERTAIN_VALUE = {"ignore": np.nan, "positive": POSITIVE, "negative": NEGATIVE}


@dataclass(frozen=True)
class PerLabelPolicy:
    """An uncertain policy per label, and the labels kept (an evaluation protocol's subset).

    ``names`` are the label vector's names in order (a dataset's ``label_names``); the
    vectors this policy is applied to must have that length. A label outside ``kept`` becomes
    NaN everywhere, so the probe neither trains nor scores on it.
    """

    names: tuple[str, ...]
    uncertain: tuple[UncertainPolicy, ...]  # one per name
    kept: tuple[bool, ...]  # one per name

    @classmethod
    def for_names(
        cls,
        names: Sequence[str],
        by_label: Mapping[str, UncertainPolicy],
        default: UncertainPolicy = "ignore",
        subset: Sequence[str] | None = None,
    ) -> PerLabelPolicy:
        """``by_label[name]`` (else ``default``) for each of ``names``; only ``subset`` kept
        (every label when None)."""
        for name, policy in [*by_label.items(), ("(default)", default)]:
            if policy not in UNCERTAIN_POLICIES:
                raise ValueError(
                    f"{name}: uncertain must be ignore|positive|negative, not {policy}"
                )
        keep = set(names if subset is None else subset)
        return cls(
            tuple(names),
            tuple(by_label.get(n, default) for n in names),
            tuple(n in keep for n in names),
        )


def apply_label_policy(
    labels: np.ndarray,
    annotated: np.ndarray,
    uncertain: UncertainPolicy | PerLabelPolicy = "ignore",
    unmentioned: UnmentionedPolicy = "negative",
) -> np.ndarray:
    """The label vector the loss sees (the `--uncertain`/`--unmentioned` policy), as float32.

    ``uncertain``: −1 → NaN (``ignore``), 1 (``positive``) or 0 (``negative``), for every label,
    or per label (a `PerLabelPolicy`, which also leaves out the labels it does not keep).
    ``unmentioned``: a NaN stored for a label in ``annotated`` → 0 (``negative``) or stays NaN
    (``ignore``). NaN for labels not annotated always stays NaN. The two rules look at the stored
    values, so an uncertain label ignored as NaN is never turned into a negative.
    """
    if not isinstance(uncertain, PerLabelPolicy) and uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be ignore|positive|negative, not {uncertain}")
    if unmentioned not in UNMENTIONED_POLICIES:
        raise ValueError(f"unmentioned must be negative|ignore, not {unmentioned}")
    stored = np.asarray(labels, dtype=np.float32)
    out = stored.copy()
    if isinstance(uncertain, PerLabelPolicy):
        if stored.shape[-1] != len(uncertain.names):
            raise ValueError(
                f"a per-label policy for {len(uncertain.names)} labels applied to "
                f"{stored.shape[-1]} values"
            )
        becomes = np.array([_UNCERTAIN_VALUE[p] for p in uncertain.uncertain], dtype=np.float32)
        out = np.where(stored == UNCERTAIN, becomes, out)
    else:
        out[stored == UNCERTAIN] = _UNCERTAIN_VALUE[uncertain]
    if unmentioned == "negative":
        out[np.isnan(stored) & annotated] = NEGATIVE
    if isinstance(uncertain, PerLabelPolicy):
        out[..., ~np.array(uncertain.kept, dtype=bool)] = np.nan
    return out.astype(np.float32)
