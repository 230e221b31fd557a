"""Where `fit` gets its batches: map-style (default) or streaming (`--streaming`).

Both give every rank the same number of steps per epoch, so collectives never wait on a rank
that ran out of data, and both say where to resume: map-style data continues at the exact batch
(the sampler's order is a function of seed and epoch), streaming data at the next row group.

Loader settings: map-style workers persist across epochs (their row-group caches with them);
batches are pinned when the caller says the device is CUDA. The rest is torch's default, checked
to be right here: each worker runs torch on one thread, the main process on the cores its
affinity mask allows, and each worker prefetches 2 batches (more only holds more batches in
memory once the loader outruns the step).
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import DataLoader, Sampler

from .data import (
    SampleTransform,
    StreamingRecords,
    collate,
    make_dataset,
    parse_sources,
    split_row_count,
)
from .data.bad_samples import BadSampleGuard
from .errors import UserError
from .sampler import GlobalBatchSampler


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """A batch sampler's batches with its epoch beside every index: ``(epoch, i)``.

    Persistent loader workers hold their own copy of the dataset, which never sees
    `set_epoch`; the epoch that seeds a sample's randomness travels with its index instead.
    """

    def __init__(self, sampler: GlobalBatchSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.sampler.epoch
        for batch in self.sampler:
            yield [(epoch, i) for i in batch]


@dataclass
class Feed:
    """A training dataset with its per-epoch batch iterator."""

    dataset: Any
    rows: int
    steps_per_epoch: int
    batch_size: int  # per rank and optimizer step (micro-batches included)
    sampler: GlobalBatchSampler | None = None
    bad_samples: BadSampleGuard = field(default_factory=lambda: BadSampleGuard(0))
    _loader: DataLoader | None = field(default=None, init=False, repr=False)

    @property
    def streaming(self) -> bool:
        """True for `--streaming` data (row groups, no sampler)."""
        return self.sampler is None

    @property
    def label_names(self) -> list[str]:
        """The aligned label names of the training data."""
        return self.dataset.label_names

    def batches(
        self, epoch: int, start_batch: int, start_unit: int, workers: int, pin_memory: bool
    ) -> Iterator[dict[str, Any]]:
        """The epoch's remaining batches for this rank."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, start_batch)
            self.dataset.set_epoch(epoch)
            if self._loader is None or self._loader.num_workers != workers:
                # One loader for the run: its workers (and their row-group caches) persist
                # across epochs; the epoch reaches them with every index (EpochBatches).
                self._loader = DataLoader(
                    self.dataset,
                    batch_sampler=EpochBatches(self.sampler),
                    num_workers=workers,
                    collate_fn=collate,
                    pin_memory=pin_memory,
                    persistent_workers=workers > 0,
                )
            return self.bad_samples.watch(self._loader)
        self.dataset.set_epoch(epoch, start_unit)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=pin_memory,
        )
        return self.bad_samples.watch(itertools.islice(loader, self.steps_per_epoch - start_batch))


def make_feed(
    args: argparse.Namespace, transform: SampleTransform, rank: int, world_size: int
) -> Feed:
    """The training data that `args` describes."""
    per_step = args.batch_size * args.accum_freq  # one optimizer step: accum_freq micro-batches
    global_batch = per_step * world_size
    guard = BadSampleGuard(args.max_bad_samples)  # images that do not decode: count, limit
    if not args.streaming:
        dataset = make_dataset(
            args.train_data,
            transform,
            split=args.train_split,
            upsampling_factors=args.train_data_upsampling_factors,
            seed=args.seed,
        )
        sampler = GlobalBatchSampler(
            len(dataset),
            per_step,
            world_size,
            rank,
            args.seed,
            row_groups=dataset.records.row_groups(),
            window=args.shuffle_window,
        )
        return Feed(dataset, len(dataset), sampler.batches_per_epoch, per_step, sampler, guard)
    sources = parse_sources(args.train_data, args.train_data_upsampling_factors)
    dataset = StreamingRecords(
        sources, transform, split=args.train_split, seed=args.seed, rank=rank, world_size=world_size
    )
    readers = world_size * max(1, args.workers)
    if len(dataset.units) < readers:
        raise UserError(
            f"--streaming: {len(dataset.units)} Parquet row groups cannot feed {readers} "
            "readers (processes x workers); use fewer workers or map-style data"
        )
    # Readers cycle through their row groups, so each rank serves the same number of steps.
    dataset.cycle = True
    rows = round(
        sum(split_row_count(files, args.train_split) * factor for files, factor in sources)
    )
    if rows < global_batch:
        raise UserError(f"{rows} training rows are fewer than one global batch ({global_batch})")
    return Feed(dataset, rows, rows // global_batch, per_step, bad_samples=guard)
