"""Data loading for ``mgll-train`` (DESIGN §8): Parquet records → training batches.

Pipeline::

    sources = parse_sources("out_a::out_b/data/*.parquet", "1::2")   # [(files, factor), ...]
    records = ParquetRecords.from_sources(sources, split="train")    # map-style, by row group
    transform = SampleTransform.from_model(model, tokenizer, label_names=records.label_names)
    dataset = MgllDataset(records, transform)
    loader = DataLoader(dataset, batch_size=..., num_workers=..., collate_fn=collate)

Decisions (documented here because the trainer and its tests rely on them):

* Parquet is read directly with pyarrow, one row group at a time (the last row group is cached
  per worker); nothing is copied into a ``datasets`` Arrow cache. The split index is built from
  the ``split`` column alone.
* Label names come from each file's ``mgll`` schema metadata. Several datasets are aligned onto
  the union of their names (the first file's order, then new names appended); a label a file does
  not carry is NaN (not annotated) in its rows.
* Upsampling factors are per-row multipliers (as open_clip's per-shard weights): a source with
  factor ``f`` contributes ``round(f * n)`` index entries per epoch — every row ``floor(f)``
  times, plus a seeded sample without replacement for the fractional part — so a row of that
  source is drawn ``f`` times as often as with factor 1.
* Images are padded to square with **0** (black; radiographs and fundus photographs have black
  surroundings), centred, aspect kept, nothing cropped; grey → 3 identical channels; bicubic
  resize; the model's mean/std. Never flipped. The optional training augmentation is a mild
  random resized crop of the padded square (scale 0.9–1.0, aspect ratio 0.95–1.05).
* Randomness (augmentation, sentence sampling) comes from a per-sample generator seeded by
  ``(seed, epoch, index)``, so a sample is identical whatever worker reads it — what exact resume
  needs. Call :meth:`MgllDataset.set_epoch` before creating each epoch's iterator.
* A text is *truncated* when its token count (with start/end tokens) exceeds the context length;
  each sample carries a ``[G]`` bool ``truncated`` flag so the trainer can log the rate per
  granularity (:class:`TruncationStats`). With ``text_sampling="sentences"`` a long text is
  replaced by a random subset of its sentences, kept in order, that fits; it is truncated only
  when no sentence fits on its own.
* ``text_ids`` are :func:`mgll_train.loss.text_hash` of each granularity's final text (after
  sentence sampling), computed in the workers.
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from mgll_train.loss import text_hash

METADATA_KEY = b"mgll"
# Row groups cached per process. A block-shuffled epoch (mgll_train.sampler) touches a window of
# row groups at a time, so each is read once instead of once per row.
ROW_GROUP_CACHE = 32
GRANULARITY_COLUMNS = {
    "category": "text_category",
    "description": "text_description",
    "explanation": "text_explanation",
}
DEFAULT_GRANULARITIES = ("category", "description", "explanation")
UncertainPolicy = Literal["ignore", "positive", "negative"]
UnmentionedPolicy = Literal["negative", "ignore"]
TextSampling = Literal["truncate", "sentences"]

# ----------------------------------------------------------------------------------- sources


def _parquet_files_in(directory: Path) -> list[Path]:
    """The Parquet files of a build directory (``data/*.parquet``; ``data/<source>/*.parquet``
    in a merged dataset) or of a plain folder."""
    data = directory / "data"
    files = sorted(data.rglob("*.parquet")) if data.is_dir() else []
    if not files:
        files = sorted(directory.glob("*.parquet"))
    if not files:
        raise ValueError(
            f"{directory}: no Parquet files (expected a dataset directory with data/*.parquet, "
            "or a folder of .parquet files)"
        )
    return files


def _resolve_hf(repo_id: str) -> list[Path]:
    """The Parquet files of ``repo_id``'s snapshot in the local Hugging Face hub cache."""
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo_id):
        raise ValueError(f"hf:{repo_id}: expected hf:org/name")
    from huggingface_hub import snapshot_download

    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    try:
        snapshot = snapshot_download(
            repo_id, repo_type="dataset", local_files_only=True, cache_dir=cache_dir
        )
    except Exception as exc:  # LocalEntryNotFoundError and friends: one line for the user
        where = cache_dir or "the default Hugging Face cache"
        raise ValueError(
            f"hf:{repo_id}: not in the local Hugging Face cache ({where}); download it first "
            f"with `huggingface-cli download --repo-type dataset {repo_id}` "
            f"({type(exc).__name__})"
        ) from None
    files = sorted(Path(snapshot).rglob("*.parquet"))
    if not files:
        raise ValueError(f"hf:{repo_id}: the cached snapshot {snapshot} has no Parquet files")
    return files


def resolve_data(spec: str) -> list[Path]:
    """The Parquet files of one data spec (no ``::``).

    ``spec`` is a dataset directory (its ``data/*.parquet``), a Parquet file, a glob, several of
    these separated by commas, or ``hf:org/name`` (the local Hugging Face hub cache only).
    """
    spec = spec.strip()
    if not spec:
        raise ValueError("empty data spec (expected a directory, Parquet files, a glob or hf:...)")
    if spec.startswith("hf:"):
        return _resolve_hf(spec[3:])
    files: list[Path] = []
    for part in (p.strip() for p in spec.split(",")):
        if any(ch in part for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(part, recursive=True))
            matches = [m for m in matches if m.is_file() and m.suffix == ".parquet"]
            if not matches:
                raise ValueError(f"{part}: the glob matches no .parquet file")
            files.extend(matches)
        else:
            path = Path(part)
            if path.is_dir():
                files.extend(_parquet_files_in(path))
            elif path.is_file():
                files.append(path)
            else:
                raise ValueError(
                    f"{part}: no such file or directory (expected a dataset directory, a "
                    "Parquet file, a glob or hf:org/name)"
                )
    return files


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
        raw = upsampling_factors.split("::")
        if len(raw) != len(parts):
            raise ValueError(
                f"{len(raw)} upsampling factors for {len(parts)} data sources "
                "(expected one per source, joined with ::)"
            )
        try:
            factors = [float(f) for f in raw]
        except ValueError:
            raise ValueError(f"upsampling factors must be numbers: {upsampling_factors}") from None
        if any(f < 0 or not math.isfinite(f) for f in factors):
            raise ValueError(f"upsampling factors must be finite and >= 0: {upsampling_factors}")
    return [(resolve_data(part), factor) for part, factor in zip(parts, factors, strict=True)]


# ---------------------------------------------------------------------------------- metadata


def read_mgll_metadata(path: Path | str) -> dict[str, Any]:
    """The ``mgll`` block of a shard's Parquet schema metadata (DESIGN §4)."""
    metadata = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in metadata:
        raise ValueError(
            f"{path}: no 'mgll' block in the Parquet schema metadata (not an mgll shard)"
        )
    block = json.loads(metadata[METADATA_KEY])
    if "label_names" not in block:
        raise ValueError(f"{path}: the 'mgll' metadata block has no label_names")
    return block


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
        file_names = list(read_mgll_metadata(file)["label_names"])
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
    """The label vector the loss sees (DESIGN §7), as float32.

    ``uncertain``: −1 → NaN (``ignore``), 1 (``positive``) or 0 (``negative``).
    ``unmentioned``: a NaN stored for a label in ``annotated`` → 0 (``negative``) or stays NaN
    (``ignore``). NaN for labels not annotated always stays NaN. The two rules look at the stored
    values, so an uncertain label ignored as NaN is never turned into a negative.
    """
    if uncertain not in ("ignore", "positive", "negative"):
        raise ValueError(f"uncertain must be ignore|positive|negative, not {uncertain}")
    if unmentioned not in ("negative", "ignore"):
        raise ValueError(f"unmentioned must be negative|ignore, not {unmentioned}")
    stored = np.asarray(labels, dtype=np.float32)
    out = stored.copy()
    is_uncertain = stored == -1
    out[is_uncertain] = {"ignore": np.nan, "positive": 1.0, "negative": 0.0}[uncertain]
    if unmentioned == "negative":
        out[np.isnan(stored) & annotated] = 0.0
    return out


# ------------------------------------------------------------------------------------ records


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


def _weighted_positions(n: int, factor: float, seed: int, source: int) -> np.ndarray:
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
    :attr:`files`. The last row group read is cached per process (so per DataLoader worker);
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
        self.metadata = [read_mgll_metadata(f) for f in self.files]
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
        files: list[Path] = []
        parts = []
        for s, (source_files, factor) in enumerate(sources):
            base = len(files)
            files.extend(Path(f) for f in source_files)
            rows = [
                np.concatenate([np.full((len(r), 1), base + i), r], axis=1)
                for i, r in enumerate(_split_rows(Path(f), split) for f in source_files)
            ]
            rows_all = np.concatenate(rows) if rows else np.zeros((0, 3), dtype=np.int64)
            parts.append(rows_all[_weighted_positions(len(rows_all), factor, seed, s)])
        index = np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)
        return cls(files, split=split, columns=columns, index=index)

    def __len__(self) -> int:
        return len(self.index)

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


# ------------------------------------------------------------------------------------- images


def image_config_from_model(
    model: torch.nn.Module,
) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """``(image_size, mean, std)`` from an open_clip model's preprocess configuration."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f"non-square model input size {size} is not supported")
        size = size[0]
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    return int(size), mean, std


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to an 8-bit ``L`` or ``RGB`` Pillow image."""
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode in ("L", "RGB"):
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
    if image.mode in ("LA", "La"):
        return image.convert("L")
    return image.convert("RGB")


def pad_resize(image: Image.Image, size: int, crop: tuple[float, ...] | None = None) -> Image.Image:
    """Pad to a centred square with 0 (aspect kept, nothing cropped) and resize to ``size``.

    ``crop`` is an optional ``(left, top, right, bottom)`` box in the padded square's
    coordinates (the augmentation's random resized crop).
    """
    width, height = image.size
    side = max(width, height)
    if crop is None:
        scale = size / side
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        canvas = Image.new(image.mode, (size, size), 0)
        canvas.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
        return canvas
    canvas = Image.new(image.mode, (side, side), 0)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas.resize((size, size), Image.Resampling.BICUBIC, box=crop)


def random_crop_box(
    side: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (0.95, 1.05),
) -> tuple[float, float, float, float]:
    """A mild random-resized-crop box inside a ``side``×``side`` square."""
    area = side * side * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = min(side, math.sqrt(area * aspect))
    h = min(side, math.sqrt(area / aspect))
    left, top = rng.uniform(0, side - w), rng.uniform(0, side - h)
    return (left, top, left + w, top + h)


def image_to_tensor(
    image: Image.Image, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """``[3, H, W]`` float32, grey replicated to 3 channels, normalised with mean/std."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


# -------------------------------------------------------------------------------------- texts

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of a text (split after ``. ! ? ;`` followed by whitespace)."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


class TextTokenizer:
    """An open_clip tokenizer with token counting, truncation flags and sentence sampling."""

    def __init__(self, tokenizer: Callable[..., torch.Tensor], context_length: int | None = None):
        self.tokenizer = tokenizer
        self.context_length = int(context_length or tokenizer.context_length)
        self._simple = (
            hasattr(tokenizer, "encode")
            and hasattr(tokenizer, "sot_token_id")
            and getattr(tokenizer, "reduction_fn", None) is None
        )

    def _ids(self, text: str) -> list[int] | None:
        """Full token ids with start/end tokens (SimpleTokenizer only)."""
        if not self._simple:
            return None
        tok = self.tokenizer
        return [tok.sot_token_id, *tok.encode(text), tok.eot_token_id]

    def count(self, text: str) -> int:
        """Number of tokens of ``text`` including the start/end tokens."""
        ids = self._ids(text)
        if ids is not None:
            return len(ids)
        inner = getattr(self.tokenizer, "tokenizer", None)
        if inner is not None and callable(inner):  # HFTokenizer
            return len(inner(text)["input_ids"])
        tokens = self.tokenizer([text], context_length=4096)
        return int((tokens != 0).sum())

    def tokenize(self, text: str) -> tuple[torch.Tensor, bool]:
        """``([L] long tokens, truncated)`` with L the context length (open_clip's cutting)."""
        ids = self._ids(text)
        if ids is None:
            truncated = self.count(text) > self.context_length
            return self.tokenizer([text], context_length=self.context_length)[0], truncated
        truncated = len(ids) > self.context_length
        if truncated:
            ids = ids[: self.context_length]
            ids[-1] = self.tokenizer.eot_token_id
        out = torch.zeros(self.context_length, dtype=torch.long)
        out[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out, truncated

    def sample_sentences(self, text: str, rng: np.random.Generator) -> str:
        """A random subset of ``text``'s sentences, in order, that fits the context length.

        Texts that already fit are returned unchanged. Sentences are visited in random order and
        kept while they fit (counting tokens of the joined result); if none fits on its own, the
        first visited sentence is returned (it will be truncated).
        """
        if self.count(text) <= self.context_length:
            return text
        sentences = split_sentences(text)
        if len(sentences) <= 1:
            return text
        chosen: list[int] = []
        for i in rng.permutation(len(sentences)):
            trial = sorted([*chosen, int(i)])
            if self.count(" ".join(sentences[j] for j in trial)) <= self.context_length:
                chosen = trial
        if not chosen:
            chosen = [int(rng.integers(len(sentences)))]
        return " ".join(sentences[j] for j in chosen)


# -------------------------------------------------------------------------------- the sample


@dataclass
class SampleTransform:
    """Turns a record (with its aligned labels) into a training sample (see module docstring)."""

    tokenizer: TextTokenizer
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    granularities: tuple[str, ...] = DEFAULT_GRANULARITIES
    uncertain: UncertainPolicy = "ignore"
    unmentioned: UnmentionedPolicy = "negative"
    text_sampling: TextSampling = "truncate"
    augment: bool = False
    columns: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        unknown = [g for g in self.granularities if g not in GRANULARITY_COLUMNS]
        if unknown or not self.granularities:
            raise ValueError(
                f"unknown granularities {unknown}; expected a list of "
                f"{','.join(GRANULARITY_COLUMNS)}"
            )
        if self.text_sampling not in ("truncate", "sentences"):
            raise ValueError(f"text_sampling must be truncate|sentences, not {self.text_sampling}")
        self.granularities = tuple(self.granularities)
        self.columns = (
            "id",
            "image",
            "labels",
            *(GRANULARITY_COLUMNS[g] for g in self.granularities),
        )

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        tokenizer: Callable[..., torch.Tensor],
        context_length: int | None = None,
        **kwargs: Any,
    ) -> SampleTransform:
        """Image size and normalisation from ``model``; ``tokenizer`` from open_clip."""
        size, mean, std = image_config_from_model(model)
        return cls(TextTokenizer(tokenizer, context_length), size, mean, std, **kwargs)

    def image(self, data: bytes, rng: np.random.Generator) -> torch.Tensor:
        """Decode, pad to square, (augment,) resize and normalise one image."""
        image = decode_image(data)
        crop = random_crop_box(max(image.size), rng) if self.augment else None
        return image_to_tensor(pad_resize(image, self.image_size, crop), self.mean, self.std)

    def texts(
        self, record: dict[str, Any], rng: np.random.Generator
    ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """``(final texts, [G, L] tokens, [G] truncated flags)``."""
        final, tokens, truncated = [], [], []
        for g in self.granularities:
            text = record.get(GRANULARITY_COLUMNS[g]) or ""
            if self.text_sampling == "sentences":
                text = self.tokenizer.sample_sentences(text, rng)
            ids, cut = self.tokenizer.tokenize(text)
            final.append(text)
            tokens.append(ids)
            truncated.append(cut)
        return final, torch.stack(tokens), torch.tensor(truncated, dtype=torch.bool)

    def __call__(
        self,
        record: dict[str, Any],
        labels: np.ndarray,
        annotated: np.ndarray,
        rng: np.random.Generator,
    ) -> dict[str, Any]:
        """The sample: ``image [3,H,W]``, ``texts [G,L]``, ``labels [K]``, ``text_ids [G]``,
        ``truncated [G]`` and ``id``."""
        texts, tokens, truncated = self.texts(record, rng)
        policy = apply_label_policy(labels, annotated, self.uncertain, self.unmentioned)
        return {
            "image": self.image(record["image"]["bytes"], rng),
            "texts": tokens,
            "labels": torch.from_numpy(policy),
            "text_ids": torch.tensor([text_hash(t) for t in texts], dtype=torch.int64),
            "truncated": truncated,
            "id": record["id"],
        }


class MgllDataset(Dataset):
    """Records + transform: the map-style training dataset handed to a DataLoader."""

    def __init__(self, records: ParquetRecords, transform: SampleTransform, seed: int = 0):
        if records.columns is None:
            records.columns = list(transform.columns)
        self.records = records
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    @property
    def label_names(self) -> list[str]:
        """The aligned label names (the order of the ``labels`` vectors)."""
        return self.records.label_names

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the per-sample randomness (before creating the iterator)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        labels, annotated = self.records.aligned_labels(record)
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        return self.transform(record, labels, annotated, rng)


class StreamingRecords(IterableDataset):
    """``--streaming``: row groups split over (rank, worker), resumable at row-group granularity.

    Each epoch orders the ``(file, row group)`` units (shuffled with ``(seed, epoch)`` when
    ``shuffle``); global worker ``w = rank * num_workers + worker`` of ``W = world_size *
    num_workers`` takes units ``w, w + W, ...`` of that order, skipping the first
    ``start_unit`` units (resume: pass one more than the last unit position the trainer finished;
    rows of row groups in flight are read again or skipped — row-group granularity, documented).
    Rows outside ``split`` are dropped when the row group is read. Each sample carries ``unit``,
    its unit's position in the epoch order, for the trainer's resume state. Rank and world size
    come from ``torch.distributed`` when initialised, else the arguments.
    """

    def __init__(
        self,
        sources: Sequence[tuple[Sequence[Path | str], float]],
        transform: SampleTransform,
        split: str | None = "train",
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        files = [Path(f) for source_files, _ in sources for f in source_files]
        self.records = ParquetRecords(files, split=split, columns=transform.columns, index=[])
        self.records.columns = [*transform.columns, "split"]
        factors = [w for source_files, w in sources for _ in source_files]
        self.units: list[tuple[int, int]] = []
        for i, (file, factor) in enumerate(zip(files, factors, strict=True)):
            groups = pq.read_metadata(file).num_row_groups
            positions = _weighted_positions(groups, factor, seed, i)
            self.units.extend((i, int(g)) for g in positions)
        self.transform, self.split, self.seed, self.shuffle = transform, split, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_unit = 0, 0
        self.cycle = False  # repeat this worker's row groups until the trainer stops reading

    @property
    def label_names(self) -> list[str]:
        """The aligned label names."""
        return self.records.label_names

    def set_epoch(self, epoch: int, start_unit: int = 0) -> None:
        """Select the epoch and the first unit position to read (resume)."""
        self.epoch, self.start_unit = int(epoch), int(start_unit)

    def order(self) -> np.ndarray:
        """The epoch's order of unit indices."""
        if not self.shuffle:
            return np.arange(len(self.units))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.units))

    def positions_for(
        self, rank: int, world_size: int, worker: int, num_workers: int, start: int | None = None
    ) -> range:
        """Positions in :meth:`order` read by one (rank, worker), from ``start`` (default:
        :attr:`start_unit`)."""
        start = self.start_unit if start is None else start
        w, total = rank * num_workers + worker, world_size * num_workers
        first = start + (w - start) % total
        return range(first, len(self.units), total)

    def _placement(self) -> tuple[int, int, int, int]:
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if ready else 0
            world = dist.get_world_size() if ready else 1
        info = get_worker_info()
        return rank, world, info.id if info else 0, info.num_workers if info else 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """This worker's rows; with ``cycle`` its row groups repeat (new row order each pass),
        so every rank can serve the same number of steps per epoch."""
        order = self.order()
        placement = self._placement()
        passes = 0
        while True:
            yielded = yield from self._one_pass(order, placement, passes)
            passes += 1
            if not self.cycle or not yielded:
                return

    def _one_pass(self, order: np.ndarray, placement: tuple[int, int, int, int], passes: int):
        yielded = 0
        for position in self.positions_for(*placement, start=self.start_unit if passes == 0 else 0):
            file, group = self.units[order[position]]
            table = self.records.read_row_group(file, group)
            rng = np.random.default_rng([self.seed, self.epoch, position, passes])
            rows = rng.permutation(table.num_rows) if self.shuffle else range(table.num_rows)
            for row in rows:
                record = table.slice(int(row), 1).to_pylist()[0]
                if self.split is not None and record["split"] != self.split:
                    continue
                record["_file"] = file
                labels, annotated = self.records.aligned_labels(record)
                sample = self.transform(record, labels, annotated, rng)
                sample["unit"] = position
                yielded += 1
                yield sample
        return yielded


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples: ``images [B,3,H,W]``, ``texts [G,B,L]`` long, ``labels [B,K]`` float,
    ``text_ids [G,B]`` int64, ``truncated [G,B]`` bool, ``ids`` list of str (and ``units``
    ``[B]`` for streaming samples)."""
    batch = {
        "images": torch.stack([s["image"] for s in samples]),
        "texts": torch.stack([s["texts"] for s in samples], dim=1),
        "labels": torch.stack([s["labels"] for s in samples]).float(),
        "text_ids": torch.stack([s["text_ids"] for s in samples], dim=1),
        "truncated": torch.stack([s["truncated"] for s in samples], dim=1),
        "ids": [s["id"] for s in samples],
    }
    if "unit" in samples[0]:  # streaming: each sample's row-group position, for resume
        batch["units"] = torch.tensor([s["unit"] for s in samples], dtype=torch.int64)
    return batch


class TruncationStats:
    """Running truncation counts per granularity, fed from batches' ``truncated`` flags."""

    def __init__(self, granularities: Sequence[str]):
        self.granularities = list(granularities)
        self.truncated = np.zeros(len(self.granularities), dtype=np.int64)
        self.total = 0

    def update(self, batch: dict[str, Any]) -> None:
        """Add one batch."""
        flags = batch["truncated"]
        self.truncated += flags.sum(dim=1).numpy().astype(np.int64)
        self.total += int(flags.shape[1])

    def rates(self) -> dict[str, float]:
        """Share of texts truncated so far, per granularity."""
        total = max(self.total, 1)
        return {
            g: float(n) / total for g, n in zip(self.granularities, self.truncated, strict=True)
        }


def make_dataset(
    spec: str,
    transform: SampleTransform,
    split: str = "train",
    upsampling_factors: str | None = None,
    seed: int = 0,
) -> MgllDataset:
    """The map-style dataset for ``--train-data``/``--val-data`` and a split."""
    records = ParquetRecords.from_sources(
        parse_sources(spec, upsampling_factors), split=split, columns=transform.columns, seed=seed
    )
    if len(records) == 0:
        raise ValueError(f"{spec}: no rows with split == {split!r}")
    return MgllDataset(records, transform, seed=seed)


__all__ = [
    "GRANULARITY_COLUMNS",
    "MgllDataset",
    "ParquetRecords",
    "SampleTransform",
    "StreamingRecords",
    "TextTokenizer",
    "TruncationStats",
    "aligned_label_names",
    "annotated_mask",
    "apply_label_policy",
    "collate",
    "decode_image",
    "image_config_from_model",
    "make_dataset",
    "pad_resize",
    "parse_sources",
    "read_mgll_metadata",
    "resolve_data",
    "split_row_count",
    "split_sentences",
]
