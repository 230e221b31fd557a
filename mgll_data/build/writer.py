"""Shard writing: rows in position order into `_build/tmp/`, renamed into `data/` when complete."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..storage import open_binary
from .items import QuarantineEntry

ROW_GROUP_SIZE = 100  # small row groups give the trainer cheap random access


def shard_name(split: str, index: int, count: int) -> str:
    """`{split}-{i:05d}-of-{n:05d}.parquet`, the Hugging Face convention."""
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


def file_sha256(path: Path) -> str:
    """SHA-256 of a local file, or of a remote one (a UPath), read in blocks."""
    digest = hashlib.sha256()
    with open_binary(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ShardPlan:
    """One shard to write: its file name and the positions (within its split) it holds."""

    split: str
    index: int
    count: int
    first: int  # first position in the split's sorted items
    size: int  # number of positions

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index, self.count)


@dataclass
class ShardStats:
    """What a finished shard holds; kept beside it so a resumed build needs no re-read."""

    name: str
    rows: int
    num_bytes: int  # size of the shard file
    sha256: str
    label_positive: list[int]
    label_annotated: list[int]
    quarantine: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


class ShardWriter:
    """Writes one shard's rows, which may arrive out of order, in position order.

    Rows are buffered only until the gap before them closes; quarantined positions close their
    gap without a row. `finish()` renames the complete file into `data/` atomically.
    """

    def __init__(self, plan: ShardPlan, schema: pa.Schema, tmp_dir: Path, data_dir: Path):
        self.plan = plan
        self.schema = schema
        self.tmp_path = tmp_dir / plan.name
        self.final_path = data_dir / plan.name
        self._next = plan.first
        self._pending: dict[int, dict[str, Any] | None] = {}
        self._group: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0
        self.quarantine: list[QuarantineEntry] = []
        num_labels = schema.field("labels").type.list_size
        self._positive = [0] * num_labels
        self._annotated = [0] * num_labels

    @property
    def done(self) -> bool:
        return self._next == self.plan.first + self.plan.size

    def add(self, position: int, record: dict[str, Any] | None) -> None:
        """Accept the outcome at `position` (None: quarantined) and write what is now in order."""
        self._pending[position] = record
        while self._next in self._pending:
            row = self._pending.pop(self._next)
            self._next += 1
            if row is not None:
                self._append(row)

    def _append(self, row: dict[str, Any]) -> None:
        self.rows += 1
        for k, value in enumerate(row["labels"]):
            if value == value:  # not NaN
                self._annotated[k] += 1
                if value == 1.0:
                    self._positive[k] += 1
        self._group.append(row)
        if len(self._group) >= ROW_GROUP_SIZE:
            self._flush()

    def _flush(self) -> None:
        if self._writer is None:
            self._writer = pq.ParquetWriter(
                self.tmp_path,
                self.schema,
                compression="snappy",
                use_dictionary=[f.name for f in self.schema if f.name != "image"],
            )
        if self._group:
            table = pa.Table.from_pylist(self._group, schema=self.schema)
            self._writer.write_table(table, row_group_size=ROW_GROUP_SIZE)
            self._group = []

    def finish(self) -> ShardStats:
        """Close the file, move it into `data/` and return its statistics."""
        assert self.done, f"{self.plan.name}: finish() before every position arrived"
        self._flush()
        assert self._writer is not None
        self._writer.close()
        sha = file_sha256(self.tmp_path)
        os.replace(self.tmp_path, self.final_path)
        return ShardStats(
            name=self.plan.name,
            rows=self.rows,
            num_bytes=self.final_path.stat().st_size,
            sha256=sha,
            label_positive=self._positive,
            label_annotated=self._annotated,
            quarantine=[q.to_json() for q in self.quarantine],
        )


def write_json(path: Path, value: Any) -> None:
    """Write JSON with sorted keys atomically (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, sort_keys=True, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def label_counts(stats: list[ShardStats]) -> tuple[Counter, Counter]:
    """Sum the per-label positive and annotated counts of several shards (by label index)."""
    positive: Counter = Counter()
    annotated: Counter = Counter()
    for s in stats:
        positive.update(dict(enumerate(s.label_positive)))
        annotated.update(dict(enumerate(s.label_annotated)))
    return positive, annotated
