"""Batch sampling that makes DDP and single-process runs see the same global batches.

Each epoch has one permutation of the dataset, drawn from (seed, epoch). Global batch k is
`perm[k*B*W : (k+1)*B*W]` and rank r takes its r-th slice of B rows, so the global batch is the
same set of rows whatever the number of processes, and the loss (invariant to row order) is too.
Resuming mid-epoch skips the batches already taken, so a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    """Per-rank batches of a seeded per-epoch permutation (the incomplete last batch dropped)."""

    def __init__(
        self, size: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0
    ):
        if size < batch_size * world_size:
            raise ValueError(
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

    @property
    def batches_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch's permutation and the first batch to yield (for resuming)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        global_batch = self.batch_size * self.world_size
        for k in range(self.start_batch, self.batches_per_epoch):
            first = k * global_batch + self.rank * self.batch_size
            yield order[first : first + self.batch_size].tolist()
