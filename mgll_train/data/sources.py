"""Which Parquet files a data spec names: directories, files, globs, `hf:org/name`, `A::B`.

Several sources are joined with `::`; each gets an upsampling factor, a per-row multiplier as in
open_clip's per-shard weights (see `weighted_positions` in `records.py`).
"""

from __future__ import annotations

import glob
import math
import os
import re
from pathlib import Path

from ..errors import UserError


def _parquet_files_in(directory: Path) -> list[Path]:
    """The Parquet files of a build directory (``data/*.parquet``; ``data/<source>/*.parquet``
    in a merged dataset) or of a plain folder."""
    data = directory / "data"
    files = sorted(data.rglob("*.parquet")) if data.is_dir() else []
    if not files:
        files = sorted(directory.glob("*.parquet"))
    if not files:
        raise UserError(
            f"{directory}: no Parquet files (expected a dataset directory with data/*.parquet, "
            "or a folder of .parquet files)"
        )
    return files


def _resolve_hf(repo_id: str) -> list[Path]:
    """The Parquet files of ``repo_id``'s snapshot in the local Hugging Face hub cache."""
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo_id):
        raise UserError(f"hf:{repo_id}: expected hf:org/name")
    from huggingface_hub import snapshot_download

    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    try:
        snapshot = snapshot_download(
            repo_id, repo_type="dataset", local_files_only=True, cache_dir=cache_dir
        )
    except Exception as exc:  # LocalEntryNotFoundError and friends: one line for the user
        where = cache_dir or "the default Hugging Face cache"
        raise UserError(
            f"hf:{repo_id}: not in the local Hugging Face cache ({where}); download it first "
            f"with `huggingface-cli download --repo-type dataset {repo_id}` "
            f"({type(exc).__name__})"
        ) from None
    files = sorted(Path(snapshot).rglob("*.parquet"))
    if not files:
        raise UserError(f"hf:{repo_id}: the cached snapshot {snapshot} has no Parquet files")
    return files


def _resolve_part(part: str) -> list[Path]:
    """The Parquet files of one comma-separated part: a glob, a directory or a file."""
    if any(ch in part for ch in "*?["):
        matches = sorted(Path(m) for m in glob.glob(part, recursive=True))
        matches = [m for m in matches if m.is_file() and m.suffix == ".parquet"]
        if not matches:
            raise UserError(f"{part}: the glob matches no .parquet file")
        return matches
    path = Path(part)
    if path.is_dir():
        return _parquet_files_in(path)
    if path.is_file():
        return [path]
    raise UserError(
        f"{part}: no such file or directory (expected a dataset directory, a "
        "Parquet file, a glob or hf:org/name)"
    )


def resolve_data(spec: str) -> list[Path]:
    """The Parquet files of one data spec (no ``::``).

    ``spec`` is a dataset directory (its ``data/*.parquet``), a Parquet file, a glob, several of
    these separated by commas, or ``hf:org/name`` (the local Hugging Face hub cache only).
    """
    spec = spec.strip()
    if not spec:
        raise UserError("empty data spec (expected a directory, Parquet files, a glob or hf:...)")
    if spec.startswith("hf:"):
        return _resolve_hf(spec[3:])
    return [file for part in spec.split(",") for file in _resolve_part(part.strip())]


def _parse_factors(upsampling_factors: str, sources: int) -> list[float]:
    """``"f1::f2::..."`` as numbers, one finite non-negative factor per source."""
    raw = upsampling_factors.split("::")
    if len(raw) != sources:
        raise UserError(
            f"{len(raw)} upsampling factors for {sources} data sources "
            "(expected one per source, joined with ::)"
        )
    try:
        factors = [float(f) for f in raw]
    except ValueError:
        raise UserError(f"upsampling factors must be numbers: {upsampling_factors}") from None
    if any(f < 0 or not math.isfinite(f) for f in factors):
        raise UserError(f"upsampling factors must be finite and >= 0: {upsampling_factors}")
    return factors


def parse_sources(
    spec: str, upsampling_factors: str | None = None
) -> list[tuple[list[Path], float]]:
    """``[(files, factor), ...]`` for a spec with sources joined by ``::``.

    ``upsampling_factors`` is ``"f1::f2::..."`` (one non-negative number per source, as
    open_clip's ``--train-data-upsampling-factors``); ``None`` means 1 for every source.
    """
    parts = spec.split("::")
    if upsampling_factors is None:
        factors = [1.0] * len(parts)
    else:
        factors = _parse_factors(upsampling_factors, len(parts))
    return [(resolve_data(part), factor) for part, factor in zip(parts, factors, strict=True)]
