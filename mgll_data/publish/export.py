"""`export`: a built (or merged) dataset as webdataset tar shards or the reference MGLL layout.

webdataset: `{split}-%06d.tar` holding, per row, `{key}.json` (id, split, source, labels by
name, positive labels, the three texts), `{key}.png` (or `.jpg`: the stored bytes, unchanged),
`{key}.mask.png` in builds with a mask column, and `{key}.txt` (the description text: what
open_clip's `--dataset-type webdataset` reads as the caption). Keys are the ids with every
character outside `[A-Za-z0-9_-]` replaced by `_` (webdataset splits a member name at its first
dot). Tars are written deterministically: rows in dataset order, members of one sample sorted by
extension, mtime 0, uid/gid 0, no user names.

mgll-json: the layout of the reference MGLL code (`util/datasets.py`): `All_data_npz/<source>/
<name>.npz` holding key `image` (uint8 array; and `mask` in builds with masks), JSON lists
`json/<list>_<split>.json` of records with `ImageID` (`/All_data/<source>/<name>.png`: the code
drops the first 9 characters and maps it to the npz), `Disease` (granularity 1), `Description`
(2), `Explanation` (3), `Keyword`, `labels`; and `<list>_train.txt` / `<list>_val.txt` (/
`_test.txt`) whose lines are those JSON paths, starting with `/` as the code concatenates them
onto its data dir.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..build.lock import LOCK_NAME, folder_lock
from ..errors import UserError
from ..record import MASK_COLUMN, SPLITS
from ..safe_names import safe_path_component
from .hub import read_manifest
from .inspect import read_card_header, verify_shards

FORMATS = ("webdataset", "mgll-json")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def shard_files(out: Path) -> list[Path]:
    """Every shard of a dataset folder (`data/*.parquet`, or `data/*/*.parquet` of a merge)."""
    files = sorted((Path(out) / "data").rglob("*.parquet"))
    if not files:
        raise UserError(f"{out}: no data/*.parquet shards")
    return files


def iter_rows(out: Path, split: str) -> Iterator[dict[str, Any]]:
    """The rows of one split, shard by shard in name order (sorted ids within a source)."""
    for path in shard_files(out):
        if path.name.split("-", 1)[0] != split:
            continue
        for batch in pq.ParquetFile(path).iter_batches(batch_size=100):
            yield from batch.to_pylist()


def sample_key(row_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", row_id)


def _label_dict(names: list[str], values: list[float]) -> dict[str, float | None]:
    return {n: (None if math.isnan(v) else v) for n, v in zip(names, values, strict=True)}


def sample_json(row: dict[str, Any], names: list[str]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "split": row["split"],
        "source": row["source"],
        "labels": _label_dict(names, row["labels"]),
        "positive_labels": list(row["positive_labels"]),
        "text_category": row["text_category"],
        "text_description": row["text_description"],
        "text_explanation": row["text_explanation"],
    }


def _image_ext(row: dict[str, Any]) -> str:
    ext = Path(str(row["image"].get("path") or "")).suffix.lower().lstrip(".")
    ext = {"jpeg": "jpg"}.get(ext, ext or "png")
    return safe_path_component(ext, f"row {row['id']!r}: image file extension")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _prepare(dest: Path, overwrite: bool) -> None:
    """Refuse a non-empty `dest` unless `overwrite`; then empty it (keeping its lock file)."""
    dest.mkdir(parents=True, exist_ok=True)
    children = [c for c in dest.iterdir() if c.name != LOCK_NAME]
    if children and not overwrite:
        raise UserError(f"{dest}: exists and is not empty; use --overwrite to replace it")
    for child in children:
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _export_name(row_id: str, fmt: str, shard: Path) -> str:
    """A row's file name in the export: its webdataset key, or mgll-json's `<source>/<stem>`."""
    what = f"{shard}: row {row_id!r}:"
    if fmt == "webdataset":
        return safe_path_component(sample_key(row_id), f"{what} sample key")
    source, colon, native = row_id.partition(":")
    if not colon:
        raise UserError(f"{what} the id is not '<source>:<native id>'")
    source = safe_path_component(source, f"{what} source")
    return f"{source}/{safe_path_component(_npz_stem(native), f'{what} file name')}"


def _npz_stem(native: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", native)


def export_names(out: Path, splits: list[str], fmt: str) -> dict[str, str]:
    """Each row id's file name in the export, all checked before anything is written.

    A name that is not a safe file name, or one that two rows would share (webdataset keys
    within a split, mgll-json files anywhere), refuses the export naming the shard and the id.
    """
    names: dict[str, str] = {}
    owners: dict[tuple[str, str], str] = {}
    for path in shard_files(out):
        split = path.name.split("-", 1)[0]
        if split not in splits:
            continue
        for row_id in pq.read_table(path, columns=["id"])["id"].to_pylist():
            name = _export_name(row_id, fmt, path)
            scope = (split if fmt == "webdataset" else "", name)
            if scope in owners:
                raise UserError(
                    f"{path}: row {row_id!r}: its file name {name!r} is also that of row "
                    f"{owners[scope]!r}"
                )
            owners[scope] = names[row_id] = name
    return names


def export(
    out: Path,
    fmt: str,
    dest: Path,
    split: str | None = None,
    samples_per_tar: int = 1000,
    list_name: str = "2level_multi_disease_list",
    overwrite: bool = False,
) -> list[str]:
    """Export the dataset at `out` into `dest`; return summary lines.

    Holds `out`'s lock as a reader and `dest`'s as a writer; a dataset with a manifest is
    exported only if its shards match it.
    """
    out, dest = Path(out), Path(dest)
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; one of {list(FORMATS)}")
    if split is not None and split not in SPLITS:
        raise UserError(f"unknown split {split!r}; one of {list(SPLITS)}")
    safe_path_component(list_name, "--list-name")
    if dest.resolve() in {out.resolve(), *out.resolve().parents}:  # --overwrite would empty it
        raise UserError(f"{dest}: the export folder may not hold the dataset {out}")
    with folder_lock(out, shared=True), folder_lock(dest):
        labels = read_card_header(out)["mgll"]["label_names"]
        if (out / "_build" / "manifest.json").is_file():
            verify_shards(out, read_manifest(out))
        present = {p.name.split("-", 1)[0] for p in shard_files(out)}
        splits = [s for s in SPLITS if s in present and (split is None or s == split)]
        if not splits:
            raise UserError(f"{out}: no shards of split {split!r}")
        names = export_names(out, splits, fmt)
        _prepare(dest, overwrite)
        if fmt == "webdataset":
            return _webdataset(out, dest, splits, labels, names, samples_per_tar)
        return _mgll_json(out, dest, splits, labels, names, list_name)


def _webdataset(
    out: Path,
    dest: Path,
    splits: list[str],
    labels: list[str],
    names: dict[str, str],
    per_tar: int,
) -> list[str]:
    lines = []
    for split in splits:
        tars, count, tar = 0, 0, None
        for row in iter_rows(out, split):
            if count % per_tar == 0:
                if tar is not None:
                    tar.close()
                tar = tarfile.open(dest / f"{split}-{tars:06d}.tar", "w", format=tarfile.PAX_FORMAT)
                tars += 1
            key = names[row["id"]]
            meta = json.dumps(sample_json(row, labels), sort_keys=True, ensure_ascii=False)
            members = {
                "json": meta.encode(),
                _image_ext(row): row["image"]["bytes"],
                "txt": row["text_description"].encode(),
            }
            if row.get(MASK_COLUMN):  # an optional column: exported where the build has it
                members["mask.png"] = row[MASK_COLUMN]["bytes"]
            for ext in sorted(members):
                _add(tar, f"{key}.{ext}", members[ext])
            count += 1
        if tar is not None:
            tar.close()
        lines.append(f"{split}: {count} samples in {tars} tar shard(s) under {dest}")
    return lines


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz (a zip of `<key>.npy` per array) with fixed timestamps, so exports are
    reproducible."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for key, array in arrays.items():
            npy = io.BytesIO()
            np.lib.format.write_array(npy, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, npy.getvalue())
    return buffer.getvalue()


_LIST_SUFFIX = {"train": "train", "validation": "val", "test": "test"}


def _mgll_json(
    out: Path,
    dest: Path,
    splits: list[str],
    labels: list[str],
    names: dict[str, str],
    list_name: str,
) -> list[str]:
    from PIL import Image

    (dest / "json").mkdir()
    lines = []
    for split in splits:
        records = []
        for row in iter_rows(out, split):
            source, stem = names[row["id"]].split("/")
            npz = dest / "All_data_npz" / source / f"{stem}.npz"
            npz.parent.mkdir(parents=True, exist_ok=True)
            arrays = {}
            for key, column in (("image", "image"), ("mask", MASK_COLUMN)):
                if row.get(column):
                    with Image.open(io.BytesIO(row[column]["bytes"])) as image:
                        arrays[key] = np.asarray(image)
            npz.write_bytes(_npz_bytes(arrays))
            records.append(
                {
                    "ImageID": f"/All_data/{source}/{stem}.png",
                    "Disease": row["text_category"],
                    "Keyword": row["text_category"],
                    "Description": row["text_description"],
                    "Explanation": row["text_explanation"],
                    "labels": _label_dict(labels, row["labels"]),
                    "id": row["id"],
                    "split": split,
                }
            )
        suffix = _LIST_SUFFIX[split]
        json_rel = f"/json/{list_name}_{suffix}.json"
        (dest / json_rel[1:]).write_text(
            json.dumps(records, sort_keys=True, ensure_ascii=False, indent=1)
        )
        (dest / f"{list_name}_{suffix}.txt").write_text(json_rel + "\n")
        lines.append(f"{split}: {len(records)} records -> {list_name}_{suffix}.txt under {dest}")
    return lines
