"""The record schema, derived from its one declaration in `schemas/record.yaml`.

Everything that needs the schema (the Arrow schema the writer uses, the Hugging Face `Features`
in the card, the validator) is derived here, so a change to the YAML changes all of them.
Columns declared `optional: true` (the segmentation `mask`) exist only in builds whose source
fills them; a build names them in its `mgll` block (`optional_columns`), and `schema_of_block`
gives the schema of that build. The YAML's `schema_version` is the one version number.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import yaml

from .record import LABEL_VALUES, MGLL_METADATA_KEY, OPTIONAL_COLUMNS_KEY
from .resources import resource_dir

if TYPE_CHECKING:  # `datasets` costs ~0.75 s to import: Ray workers and scans never need it
    from datasets import Features

# The declaration's file keeps its name across versions: its `schema_version` line is the version.
DECLARATION_FILE = "record.yaml"


@dataclass(frozen=True)
class Column:
    """One declared column of the record."""

    name: str
    type: str
    nullable: bool
    doc: str
    length: int | str | None = None
    enum: tuple[str, ...] | None = None
    non_empty: bool = False
    optional: bool = False  # present only in builds whose source fills it


@dataclass(frozen=True)
class RecordSchema:
    """The record schema for one label count K (one vocabulary)."""

    version: int
    columns: tuple[Column, ...]
    num_labels: int

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def fixed_length(self, column: Column) -> int | None:
        if column.length == "K":
            return self.num_labels
        return column.length if isinstance(column.length, int) else None

    def features(self) -> Features:
        """The Hugging Face `Features` of a record."""
        from datasets import Features

        return Features({c.name: self._feature(c) for c in self.columns})

    def _feature(self, column: Column) -> Any:
        from datasets import Image, List, Value

        scalar = {"string": Value("string"), "int32": Value("int32"), "float32": Value("float32")}
        if column.type == "image":
            return Image()
        if column.type in scalar:
            return scalar[column.type]
        if column.type.startswith("list<") and column.type.endswith(">"):
            inner = scalar[column.type[5:-1]]
            length = self.fixed_length(column)
            return List(inner, length=length) if length else List(inner)
        raise ValueError(f"record schema: unknown type {column.type!r} for column {column.name!r}")

    def arrow_schema(self, mgll_metadata: Mapping[str, Any] | None = None) -> pa.Schema:
        """The Arrow schema the shards are written with.

        It carries the `huggingface` metadata (so `datasets` restores the Image feature) and, when
        given, the `mgll` block (label names, vocabulary version) that every shard must have.
        """
        schema = self.features().arrow_schema
        fields = [schema.field(c.name).with_nullable(c.nullable) for c in self.columns]
        metadata = dict(schema.metadata or {})
        if mgll_metadata is not None:
            metadata[MGLL_METADATA_KEY] = dumps_sorted(dict(mgll_metadata)).encode()
        return pa.schema(fields, metadata=metadata)

    def card_features(self) -> list[dict[str, Any]]:
        """The `dataset_info.features` list of the card's YAML header."""
        return self.features()._to_yaml_list()


@cache
def _declaration() -> dict[str, Any]:
    with open(resource_dir("schemas") / DECLARATION_FILE, encoding="utf-8") as f:
        return yaml.safe_load(f)


def schema_version() -> int:
    """The declared record schema version (the YAML's `schema_version`)."""
    return int(_declaration()["schema_version"])


def optional_columns() -> list[str]:
    """The names of the columns declared `optional: true`, in declaration order."""
    return [c["name"] for c in _declaration()["columns"] if c.get("optional", False)]


def record_schema(num_labels: int, with_optional: Collection[str] = ()) -> RecordSchema:
    """The declared record schema for a vocabulary of `num_labels` labels.

    Optional columns are included only when named in `with_optional` (the build has them).
    """
    declared = _declaration()
    unknown = sorted(set(with_optional) - set(optional_columns()))
    if unknown:
        raise ValueError(f"record schema: {unknown} are not optional columns {optional_columns()}")
    columns = tuple(
        Column(
            name=c["name"],
            type=c["type"],
            nullable=bool(c["nullable"]),
            doc=c.get("doc", ""),
            length=c.get("length"),
            enum=tuple(c["enum"]) if "enum" in c else None,
            non_empty=bool(c.get("non_empty", False)),
            optional=bool(c.get("optional", False)),
        )
        for c in declared["columns"]
        if not c.get("optional", False) or c["name"] in with_optional
    )
    return RecordSchema(version=declared["schema_version"], columns=columns, num_labels=num_labels)


def schema_of_block(mgll_block: Mapping[str, Any]) -> RecordSchema:
    """The schema of the build whose `mgll` metadata block is given (its labels, its columns)."""
    return record_schema(len(mgll_block["label_names"]), mgll_block.get(OPTIONAL_COLUMNS_KEY, ()))


def dumps_sorted(value: Any) -> str:
    """JSON with sorted keys and no NaN (the only JSON this project writes)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False)


def validate_row(
    row: Mapping[str, Any], schema: RecordSchema, label_names: Sequence[str]
) -> list[str]:
    """Check one record against the schema; return the problems found (empty when valid)."""
    problems: list[str] = []
    unexpected = sorted(set(row) - set(schema.names))
    if unexpected:  # the writer would drop them silently
        problems.append(f"columns {unexpected} are not in this build's schema")
    for column in schema.columns:
        if column.name not in row:
            problems.append(f"missing column {column.name!r}")
            continue
        value = row[column.name]
        if value is None:
            if not column.nullable:
                problems.append(f"{column.name} is null")
            continue
        problems.extend(_check_value(column, value, schema))
    if problems:
        return problems

    labels = row["labels"]
    bad = [v for v in labels if not (math.isnan(v) or v in LABEL_VALUES)]
    if bad:
        problems.append(f"labels hold values other than 1/0/-1/NaN: {bad[:3]}")
    expected_positive = [n for n, v in zip(label_names, labels, strict=True) if v == 1.0]
    if list(row["positive_labels"]) != expected_positive:
        problems.append(
            f"positive_labels {row['positive_labels']} disagree with labels ({expected_positive})"
        )
    if not str(row["id"]).startswith(f"{row['source']}:"):
        problems.append(f"id {row['id']!r} does not start with '{row['source']}:'")
    for column in schema.columns:
        if column.type == "image" and row[column.name] is not None:
            problems.extend(_check_image(column.name, row[column.name], str(row["id"])))
    try:
        extra = json.loads(row["extra"])
        if row["extra"] != dumps_sorted(extra):
            problems.append("extra is not JSON with sorted keys")
    except json.JSONDecodeError as err:
        problems.append(f"extra is not JSON: {err}")
    return problems


def _check_image(name: str, image: Mapping[str, Any], record_id: str) -> list[str]:
    problems = []
    if not image.get("bytes"):
        problems.append(f"{name} has no bytes")
    if image.get("path") and not str(image["path"]).startswith(record_id):
        problems.append(f"{name} path {image['path']!r} is not named after the id")
    return problems


def _check_value(column: Column, value: Any, schema: RecordSchema) -> list[str]:
    problems = []
    kind = column.type
    if kind == "string" and not isinstance(value, str):
        problems.append(f"{column.name} is not a string")
    elif kind == "int32" and (not isinstance(value, int) or value < 0):
        problems.append(f"{column.name} is not a non-negative integer")
    elif kind.startswith("list<"):
        length = schema.fixed_length(column)
        if length is not None and len(value) != length:
            problems.append(f"{column.name} has length {len(value)}, expected {length}")
    if column.enum and value not in column.enum:
        problems.append(f"{column.name}={value!r} not one of {list(column.enum)}")
    if column.non_empty and isinstance(value, str) and not value.strip():
        problems.append(f"{column.name} is empty")
    return problems
