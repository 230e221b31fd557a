"""GlobalBatchSampler: the same global batches for any number of processes; block shuffling."""

from __future__ import annotations

import numpy as np
import pytest

from mgll_train.sampler import GlobalBatchSampler


def _global_batches(world_size: int, per_rank: int, **kwargs) -> list[set[int]]:
    ranks = [
        list(GlobalBatchSampler(70, per_rank, world_size, r, seed=3, **kwargs))
        for r in range(world_size)
    ]
    return [set().union(*parts) for parts in zip(*ranks, strict=True)]


@pytest.mark.parametrize("window", [0, 2])
def test_global_batches_do_not_depend_on_the_number_of_processes(window):
    groups = np.repeat(np.arange(10), 7)
    one = _global_batches(1, 12, row_groups=groups, window=window)
    three = _global_batches(3, 4, row_groups=groups, window=window)
    assert one == three and len(one) == 70 // 12
    assert all(len(batch) == 12 for batch in one)


def test_block_shuffle_covers_each_row_once_and_stays_in_its_window():
    groups = np.repeat(np.arange(10), 7)[np.random.default_rng(0).permutation(70)]
    sampler = GlobalBatchSampler(70, 7, row_groups=groups, window=2)
    order = [i for batch in sampler for i in batch]
    assert sorted(order) == list(range(70))
    for start in range(0, 70, 14):  # each run of 2 groups (14 rows) holds exactly 2 groups
        assert len({groups[i] for i in order[start : start + 14]}) == 2
    uniform = [i for b in GlobalBatchSampler(70, 7, row_groups=groups) for i in b]
    assert len({groups[i] for i in uniform[:14]}) > 2


def test_epochs_differ_and_resume_skips_taken_batches():
    sampler = GlobalBatchSampler(50, 5, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0, start_batch=4)
    assert list(sampler) == first[4:] and len(sampler) == len(first) - 4
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(7, 4, world_size=2)
