"""Where `fit` gets its batches: map-style (default) or streaming (`--streaming`).

Both give every rank the same number of steps per epoch, so collectives never wait on a rank
that ran out of data, and both say where to resume: map-style data continues at the exact batch
(the sampler's order is a function of seed and epoch), streaming data at the next row group.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader

from .data import (
    SampleTransform,
    StreamingRecords,
    collate,
    make_dataset,
    parse_sources,
    split_row_count,
)
from .errors import UserError
from .sampler import GlobalBatchSampler


@dataclass
class Feed:
    """A training dataset with its per-epoch batch iterator."""

    dataset: Any
    rows: int
    steps_per_epoch: int
    batch_size: int  # per rank and optimizer step (micro-batches included)
    sampler: GlobalBatchSampler | None = None

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
            return iter(
                DataLoader(
                    self.dataset,
                    batch_sampler=self.sampler,
                    num_workers=workers,
                    collate_fn=collate,
                    pin_memory=pin_memory,
                )
            )
        self.dataset.set_epoch(epoch, start_unit)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=pin_memory,
        )
        return itertools.islice(loader, self.steps_per_epoch - start_batch)


def make_feed(
    args: argparse.Namespace, transform: SampleTransform, rank: int, world_size: int
) -> Feed:
    """The training data that `args` describes."""
    per_step = args.batch_size * args.accum_freq  # one optimizer step: accum_freq micro-batches
    global_batch = per_step * world_size
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
        return Feed(dataset, len(dataset), sampler.batches_per_epoch, per_step, sampler)
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
    return Feed(dataset, rows, rows // global_batch, per_step)
