"""The map-style training dataset (records + transform), batching, and truncation counts.

Call `MgllDataset.set_epoch` before creating each epoch's iterator: the per-sample randomness
is seeded by `(seed, epoch, index)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError
from .bad_samples import MAX_SUBSTITUTES, Skipped
from .images import UnreadableImage
from .labels import check_annotated
from .records import ParquetRecords
from .sources import parse_sources
from .transforms import SampleTransform


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

    def __getitem__(self, i: int | tuple[int, int]) -> dict[str, Any]:
        """Sample ``i`` (or ``(epoch, i)``: that epoch's, whatever `set_epoch` said); an image
        that does not decode is replaced by the next rows' (see `bad_samples`), and the
        sample's ``skipped`` lists what was passed over."""
        epoch, i = i if isinstance(i, tuple) else (self.epoch, i)
        skipped: list[Skipped] = []
        for j in range(i, i + MAX_SUBSTITUTES):
            record = self.records[j % len(self.records)]
            labels, annotated = self.records.aligned_labels(record)
            rng = np.random.default_rng([self.seed, epoch, int(i)])
            try:
                sample = self.transform(record, labels, annotated, rng)
            except UnreadableImage as err:
                file = str(self.records.files[record["_file"]])
                skipped.append((str(record["id"]), file, str(err)))
                continue
            return sample | {"skipped": skipped} if skipped else sample
        # Nothing decodes here: a placeholder the main process refuses (BadSampleGuard).
        return self.transform(record, labels, annotated, rng, decode=False) | {
            "skipped": skipped,
            "unusable": True,
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
        raise UserError(f"{spec}: no rows with split == {split!r}")
    check_annotated(spec, records.annotated_values, transform.labels_required)
    return MgllDataset(records, transform, seed=seed)


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples: ``images [B,3,H,W]``, ``texts [G,B,L]`` long, ``labels [B,K]`` float,
    ``text_ids [G,B]`` int64, ``truncated [G,B]`` bool, ``ids`` list of str (and ``units``
    ``[B]`` for streaming samples, ``masks [B,1,H,W]`` for samples with a mask)."""
    batch = {
        "images": torch.stack([s["image"] for s in samples]),
        "texts": torch.stack([s["texts"] for s in samples], dim=1),
        "labels": torch.stack([s["labels"] for s in samples]).float(),
        "text_ids": torch.stack([s["text_ids"] for s in samples], dim=1),
        "truncated": torch.stack([s["truncated"] for s in samples], dim=1),
        "ids": [s["id"] for s in samples],
    }
    if "mask" in samples[0]:  # segmentation: SampleTransform(masks=True)
        batch["masks"] = torch.stack([s["mask"] for s in samples])
    if "unit" in samples[0]:  # streaming: each sample's row-group position, for resume
        batch["units"] = torch.tensor([s["unit"] for s in samples], dtype=torch.int64)
    skipped = [entry for s in samples for entry in s.get("skipped", ())]
    if skipped:  # unreadable images passed over (counted by the main process)
        batch["skipped"] = skipped
        batch["unusable"] = any(s.get("unusable", False) for s in samples)
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
