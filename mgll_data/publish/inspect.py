"""`validate` and `info`: read a built dataset back and check it against the schema."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from ..build.writer import ROW_GROUP_SIZE, file_sha256
from ..errors import UserError
from ..record import SPLITS, read_mgll_metadata
from ..safe_names import safe_relative_path
from ..schema import schema_of_block, validate_row


def read_card_header(out: Path) -> dict[str, Any]:
    """The YAML header of `out/README.md`."""
    if not out.exists():
        raise UserError(f"{out}: no such folder")
    if not out.is_dir():
        raise UserError(f"{out}: not a folder (expected a built mgll dataset)")
    card = out / "README.md"
    if not card.is_file():
        raise UserError(f"{out}: no README.md (not a built mgll dataset?)")
    text = card.read_text(encoding="utf-8")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        raise UserError(f"{card}: no YAML header between '---' lines")
    return yaml.safe_load(text[4 : text.index("\n---\n", 4)])


def data_files(out: Path) -> list[Path]:
    """The shards: `data/*.parquet`, or `data/<source>/*.parquet` in a merged dataset."""
    files = sorted((out / "data").rglob("*.parquet"))
    if not files:
        raise UserError(f"{out}: no data/*.parquet shards")
    return files


def verify_shards(out: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """Check `out`'s shards against its manifest before trusting them; return path -> sha256.

    Refuses, in one line naming the first such shard, a shard on disk that the manifest does
    not list, one it lists that is missing, and one whose sha256 differs from the recorded one.
    """
    out = Path(out)
    where = out / "_build" / "manifest.json"
    listed = {
        safe_relative_path(str(entry.get("path")), f"{where}: shard path"): entry.get("sha256")
        for entry in manifest.get("shards", [])
    }
    for path in data_files(out):
        if path.relative_to(out).as_posix() not in listed:
            raise UserError(f"{path}: not in {where} (a stray file?)")
    hashes = {}
    for rel, expected in listed.items():
        shard = out / rel
        if not shard.is_file():
            raise UserError(f"{shard}: listed in {where} but missing")
        hashes[rel] = file_sha256(shard)
        if hashes[rel] != expected:
            raise UserError(
                f"{shard}: sha256 differs from the manifest (changed since the build); "
                "rebuild it, or see `mgll-build-dataset validate`"
            )
    return hashes


def _shard_block_problem(shard: dict[str, Any], card: dict[str, Any]) -> str | None:
    """Why a shard's `mgll` block does not belong to the card's (None when it does).

    A merged dataset's card holds the union of annotated labels and, under `sources`, each
    source's own block; its shards keep their source's block byte for byte.
    """
    if "sources" not in card:
        return None if shard == card else "'mgll' metadata differs from the card's"
    for key in ("schema_version", "domain", "vocab_version", "label_names"):
        if shard.get(key) != card.get(key):
            return f"'mgll' {key} differs from the card's"
    known = [s.get("annotated_labels") for s in card["sources"].values()]
    if shard.get("annotated_labels") not in known:
        return "'mgll' annotated_labels match no source in the card"
    return None


def validate_dataset(out: Path) -> list[str]:
    """Every problem found in the dataset at `out` (empty list: valid)."""
    out = Path(out)
    header = read_card_header(out)
    problems: list[str] = []
    mgll = header.get("mgll")
    if not mgll:
        return [f"{out / 'README.md'}: no 'mgll' block in the YAML header"]
    label_names = mgll["label_names"]
    schema = schema_of_block(mgll)
    expected_schema = schema.arrow_schema(mgll)
    infos = header.get("dataset_info", {})
    for info in infos if isinstance(infos, list) else [infos]:  # a list: one per config
        if info.get("features") != schema.card_features():
            problems.append("README.md: dataset_info.features differ from the record schema")
    listed = {
        path
        for config in header.get("configs", [])
        for entry in config["data_files"]
        for path in ([entry["path"]] if isinstance(entry["path"], str) else entry["path"])
    }
    files = data_files(out)
    present = {path.relative_to(out).as_posix() for path in files}
    for path in sorted(listed - present):
        problems.append(f"README.md lists {path}, which does not exist")

    manifest_path = out / "_build" / "manifest.json"
    hashes = {}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if not manifest.get("complete"):
            problems.append(f"{manifest_path}: build not complete (finish it with --resume)")
        hashes = {s["path"]: s["sha256"] for s in manifest.get("shards", [])}

    seen_ids: set[str] = set()
    patients: dict[str, set[str]] = defaultdict(set)
    for path in files:
        rel = path.relative_to(out).as_posix()
        where = str(path)
        if rel not in listed:
            problems.append(f"{where}: not listed in the card's data_files")
        if rel in hashes and file_sha256(path) != hashes[rel]:
            problems.append(f"{where}: sha256 differs from the manifest")
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as err:
            problems.append(f"{where}: not a readable Parquet file ({err})")
            continue
        try:
            problem = _shard_block_problem(read_mgll_metadata(parquet.schema_arrow, where), mgll)
            if problem:
                problems.append(f"{where}: {problem}")
        except ValueError as err:
            problems.append(str(err))
        if not parquet.schema_arrow.equals(expected_schema, check_metadata=False):
            problems.append(f"{where}: Arrow schema differs from record schema v1")
            continue
        sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
        if any(size > ROW_GROUP_SIZE for size in sizes):
            problems.append(f"{where}: row groups larger than {ROW_GROUP_SIZE} rows")
        split_of_file = path.name.split("-", 1)[0]
        for batch in parquet.iter_batches(batch_size=ROW_GROUP_SIZE):
            for row in batch.to_pylist():
                for problem in validate_row(row, schema, label_names):
                    problems.append(f"{where}: {row.get('id')}: {problem}")
                if row["split"] != split_of_file:
                    problems.append(f"{where}: {row['id']}: split {row['split']} in {path.name}")
                if row["id"] in seen_ids:
                    problems.append(f"{where}: duplicate id {row['id']}")
                seen_ids.add(row["id"])
                if row["patient_id"] is not None:
                    patients[row["patient_id"]].add(row["split"])
    shared = sorted(p for p, splits in patients.items() if len(splits) > 1)
    if shared:
        problems.append(f"{len(shared)} patients are in more than one split (e.g. {shared[0]})")
    return problems


def dataset_info(out: Path) -> str:
    """A readable summary: rows per split and label prevalence (positives / annotated)."""
    out = Path(out)
    mgll = read_card_header(out)["mgll"]
    names = mgll["label_names"]
    rows: Counter = Counter()
    positive: dict[str, Counter] = defaultdict(Counter)
    annotated: dict[str, Counter] = defaultdict(Counter)
    for path in data_files(out):
        table = pq.read_table(path, columns=["split", "labels"])
        for split, labels in zip(
            table["split"].to_pylist(), table["labels"].to_pylist(), strict=True
        ):
            rows[split] += 1
            for name, value in zip(names, labels, strict=True):
                if not math.isnan(value):
                    annotated[split][name] += 1
                    positive[split][name] += value == 1.0
    splits = [s for s in SPLITS if rows[s]]
    lines = [
        f"{out}: {sum(rows.values())} rows, domain {mgll['domain']}, "
        f"vocabulary {mgll['vocab_version']}, {len(names)} labels"
    ]
    lines.append("rows:  " + ", ".join(f"{s} {rows[s]}" for s in splits))
    lines.append(f"{'label':28}" + "".join(f"{s:>18}" for s in splits))
    for name in names:
        cells = []
        for s in splits:
            if annotated[s][name]:
                share = positive[s][name] / annotated[s][name]
                cells.append(f"{positive[s][name]:>6} ({share:6.1%})")
            else:
                cells.append("   not annotated")
        lines.append(f"{name:28}" + "".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)
