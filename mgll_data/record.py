"""The record contract shared by both halves: what a built shard holds and how to read its block.

`mgll_data` writes records and `mgll_train` reads them; both import their column names, label
values, granularities and the `mgll` metadata block from here, so the contract is declared once.
This module is light on purpose (no `datasets`, no torch): the trainer imports it at start-up.
The full column list with types lives in `schemas/record.yaml` (see `mgll_data.schema`);
`docs/architecture.md` ("The record") explains every field.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 2  # schemas/record.yaml's schema_version (a test keeps them equal)
# Versions a reader accepts: version 2 only added optional columns, so a version 1 build reads as
# a version 2 build without them.
COMPATIBLE_SCHEMA_VERSIONS = (1, 2)
# Key of the JSON block in every shard's Parquet schema metadata (label names, vocabulary, domain).
MGLL_METADATA_KEY = b"mgll"
SPLITS = ("train", "validation", "test")
# Key in the `mgll` block listing the optional columns a build has (absent: none).
OPTIONAL_COLUMNS_KEY = "optional_columns"
# The optional segmentation mask: a PNG of the stored image's size, 255 inside a finding.
MASK_COLUMN = "mask"

# Values of the `labels` vector; NaN means "not mentioned / not annotated".
POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
LABEL_VALUES = (POSITIVE, NEGATIVE, UNCERTAIN)

# The three granularities, coarse to fine, and the text column each lives in.
GRANULARITIES = ("category", "description", "explanation")
GRANULARITY_COLUMNS = {g: f"text_{g}" for g in GRANULARITIES}
TEXT_COLUMNS = tuple(GRANULARITY_COLUMNS.values())

_MASK_63 = (1 << 63) - 1


def text_hash(text: str) -> int:
    """A stable 63-bit non-negative id of a text string.

    The first 8 bytes of ``blake2b(text.encode("utf-8"), digest_size=8)`` read little-endian and
    masked to 63 bits, so it fits a non-negative int64 and is identical in every process, worker
    and Python version (never Python's salted ``hash()``). The loss uses it to tell which rows of
    a global batch carry the same text.
    """
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK_63


def read_mgll_metadata(source: pa.Schema | Path | str, where: str | None = None) -> dict[str, Any]:
    """The `mgll` block of a shard, from its Arrow schema or its path; raises naming the file.

    `where` names the file in the error when `source` is a schema.
    """
    if isinstance(source, pa.Schema):
        schema = source
    else:
        schema, where = pq.read_schema(source), where or str(source)
    raw = (schema.metadata or {}).get(MGLL_METADATA_KEY)
    if raw is None:
        raise ValueError(f"{where}: no 'mgll' metadata in the Parquet schema (not an mgll shard?)")
    block = json.loads(raw)
    if "label_names" not in block:
        raise ValueError(f"{where}: the 'mgll' metadata block has no label_names")
    return block
