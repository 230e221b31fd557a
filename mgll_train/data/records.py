"""Map-style records of Parquet shards, read one row group at a time with pyarrow.

Nothing is copied into a `datasets` Arrow cache; the split index is built from the `split`
column alone, and the last row groups read are cached per process (so per DataLoader worker).

Upsampling factors are per-row multipliers (as open_clip's per-shard weights): a source with
factor `f` contributes `round(f * n)` index entries per epoch — every row `floor(f)` times,
plus a seeded sample without replacement for the fractional part — so a row of that source is
drawn `f` times as often as with factor 1.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import Dataset

from .labels import aligned_label_names, annotated_mask, check_stored_labels, shard_metadata

# Row groups cached per process. A block-shuffled epoch (mgll_train.sampler) touches a window of
# row groups at a time, so each is read once instead of once per row.
ROW_GROUP_CACHE = 32


def _split_rows(file: Path, split: str | None) -> np.ndarray:
    """``[n, 2]`` (row group, row in group) of the rows of ``file`` in ``split`` (None: all)."""
    meta = pq.read_metadata(file)
    sizes = np.array([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    starts = np.concatenate([[0], np.cumsum(sizes)])[:-1]
    if split is None:
        flat = np.arange(meta.num_rows)
    else:
        column = pq.read_table(file, columns=["split"])["split"]
        flat = np.flatnonzero(np.asarray(column.to_numpy(zero_copy_only=False)) == split)
    groups = np.searchsorted(starts, flat, side="right") - 1
    return np.stack([groups, flat - starts[groups]], axis=1).astype(np.int64)


def split_row_count(files: Sequence[Path | str], split: str | None) -> int:
    """How many rows of `files` are in `split` (read from the `split` column alone)."""
    return sum(len(_split_rows(Path(f), split)) for f in files)


def weighted_positions(n: int, factor: float, seed: int, source: int) -> np.ndarray:
    """Positions ``0..n-1`` repeated ``floor(factor)`` times plus a seeded fractional sample."""
    whole = int(math.floor(factor))
    extra = int(round((factor - whole) * n))
    parts = [np.tile(np.arange(n), whole)]
    if extra:
        rng = np.random.default_rng([seed, source])
        parts.append(np.sort(rng.choice(n, size=extra, replace=False)))
    return np.concatenate(parts).astype(np.int64)


class ParquetRecords(Dataset):
    """Map-style records of Parquet shards, read by row group with pyarrow.

    ``index[i] = (file, row group, row in group)``. ``self[i]`` returns the row as a dict
    (``image`` is ``{"bytes", "path"}``) plus ``"_file"``, the file's position in
    :attr:`files`. The last row groups read are cached per process (so per DataLoader worker);
    open file handles are not pickled.
    """

    def __init__(
        self,
        files: Sequence[Path | str],
        split: str | None = "train",
        columns: Sequence[str] | None = None,
        index: np.ndarray | None = None,
    ):
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ValueError("ParquetRecords: no Parquet files")
        self.split = split
        self.columns = list(columns) if columns is not None else None
        self.label_names, self.index_maps = aligned_label_names(self.files)
        self.metadata = [shard_metadata(f) for f in self.files]
        # Malformed labels are refused here, before any training; annotated values counted.
        self.annotated_values = sum(
            check_stored_labels(f, m["label_names"])
            for f, m in zip(self.files, self.metadata, strict=True)
        )
        if index is None:
            parts = [
                np.concatenate([np.full((len(rows), 1), i), rows], axis=1)
                for i, rows in ((i, _split_rows(f, split)) for i, f in enumerate(self.files))
            ]
            index = np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, 3))
        self.index = np.asarray(index, dtype=np.int64).reshape(-1, 3)
        self._handles: dict[int, pq.ParquetFile] = {}
        self._cached: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self.row_group_reads = 0  # row groups read from disk by this process (cache misses)

    @classmethod
    def from_sources(
        cls,
        sources: Sequence[tuple[Sequence[Path | str], float]],
        split: str | None = "train",
        columns: Sequence[str] | None = None,
        seed: int = 0,
    ) -> ParquetRecords:
        """A weighted concatenation of several sources (``parse_sources``'s output).

        Source ``s`` with ``n_s`` rows in ``split`` and factor ``f_s`` contributes
        ``round(f_s * n_s)`` entries (see the module docstring); deterministic for ``seed``.
        """
        files = [Path(f) for source_files, _ in sources for f in source_files]
        # The metadata is read (and checked) first, so a file that is not an mgll shard is
        # named as such before its `split` column is looked for.
        records = cls(files, split=split, columns=columns, index=np.zeros((0, 3)))
        parts = []
        base = 0
        for s, (source_files, factor) in enumerate(sources):
            rows = [
                np.concatenate([np.full((len(r), 1), base + i), r], axis=1)
                for i, r in enumerate(_split_rows(Path(f), split) for f in source_files)
            ]
            base += len(source_files)
            rows_all = np.concatenate(rows) if rows else np.zeros((0, 3), dtype=np.int64)
            parts.append(rows_all[weighted_positions(len(rows_all), factor, seed, s)])
        index = np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)
        records.index = np.asarray(index, dtype=np.int64).reshape(-1, 3)
        return records

    def __len__(self) -> int:
        return len(self.index)

    def with_columns(self, columns: Sequence[str]) -> ParquetRecords:
        """These records (same files, rows and labels) reading ``columns`` instead."""
        other = copy.copy(self)
        other.columns = list(columns)
        other._handles, other._cached = {}, OrderedDict()  # tables of the old columns
        other.row_group_reads = 0
        return other

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"], state["_cached"] = {}, OrderedDict()
        return state

    def read_row_group(self, file: int, group: int) -> pa.Table:
        """One row group, from a small per-process LRU cache of the last row groups read."""
        key = (file, group)
        table = self._cached.get(key)
        if table is not None:
            self._cached.move_to_end(key)
            return table
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = pq.ParquetFile(self.files[file])
        table = handle.read_row_group(group, columns=self.columns)
        self.row_group_reads += 1
        self._cached[key] = table
        if len(self._cached) > ROW_GROUP_CACHE:
            self._cached.popitem(last=False)
        return table

    def row_groups(self) -> np.ndarray:
        """For every index entry, an integer naming its (file, row group): for block shuffling."""
        return self.index[:, 0] * (1 << 32) + self.index[:, 1]

    def __getitem__(self, i: int) -> dict[str, Any]:
        file, group, row = (int(v) for v in self.index[i])
        record = self.read_row_group(file, group).slice(row, 1).to_pylist()[0]
        record["_file"] = file
        return record

    def aligned_labels(self, record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """``(labels, annotated)`` of a record on :attr:`label_names` (missing labels: NaN)."""
        file = record["_file"]
        positions = self.index_maps[self.files[file]]
        stored = np.asarray(record["labels"], dtype=np.float32)
        labels = np.full(len(positions), np.nan, dtype=np.float32)
        present = positions >= 0
        labels[present] = stored[positions[present]]
        annotated = annotated_mask(self.metadata[file], self.label_names) & present
        return labels, annotated
