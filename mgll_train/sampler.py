"""Batch sampling that makes DDP and single-process runs see the same global batches.

Each epoch has one permutation of the dataset, drawn from (seed, epoch). Global batch k is
`perm[k*B*W : (k+1)*B*W]` and rank r takes its r-th slice of B rows, so the global batch is the
same set of rows whatever the number of processes, and the loss (invariant to row order) is too.
Resuming mid-epoch skips the batches already taken, so a resumed run continues exactly.

With `window` > 0 the permutation is block-shuffled: row groups are put in random order and
rows are shuffled only within runs of `window` row groups. Reading one row from Parquet costs
reading its whole row group, so a fully random order reads every row group about once per row;
the block order reads each once per epoch (benchmarks/data_loading.py measures both). Batches
then mix `window` row groups, not the whole dataset: choose the window as large as the row-group
cache (`mgll_train.data.records.ROW_GROUP_CACHE`) allows.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from .errors import UserError


class GlobalBatchSampler(Sampler[list[int]]):
    """Per-rank batches of a seeded per-epoch permutation (the incomplete last batch dropped)."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        row_groups: np.ndarray | None = None,
        window: int = 0,
    ):
        if size < batch_size * world_size:
            raise UserError(
                f"{size} training rows are fewer than one global batch "
                f"({batch_size} x {world_size} processes)"
            )
        self.size = size
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0
        self.window = window if row_groups is not None else 0
        if self.window:
            # The rows of each row group, in index order; the groups in order of first row.
            _, first, inverse = np.unique(row_groups, return_index=True, return_inverse=True)
            rank_of_group = np.argsort(np.argsort(first))
            members = np.argsort(rank_of_group[inverse], kind="stable")
            counts = np.bincount(rank_of_group[inverse])
            self.group_rows = np.split(members, np.cumsum(counts)[:-1])

    @property
    def batches_per_epoch(self) -> int:
        """Full global batches per epoch (the incomplete last one is dropped)."""
        return self.size // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch's permutation and the first batch to yield (for resuming)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = (
            self._block_order(generator)
            if self.window
            else torch.randperm(self.size, generator=generator)
        )
        global_batch = self.batch_size * self.world_size
        for k in range(self.start_batch, self.batches_per_epoch):
            first = k * global_batch + self.rank * self.batch_size
            yield order[first : first + self.batch_size].tolist()

    def _block_order(self, generator: torch.Generator) -> torch.Tensor:
        groups = torch.randperm(len(self.group_rows), generator=generator).tolist()
        runs = []
        for start in range(0, len(groups), self.window):
            rows = np.concatenate([self.group_rows[g] for g in groups[start : start + self.window]])
            runs.append(torch.from_numpy(rows)[torch.randperm(len(rows), generator=generator)])
        return torch.cat(runs)
