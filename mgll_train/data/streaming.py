"""`--streaming`: row groups split over (rank, worker), resumable at row-group granularity."""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .bad_samples import Skipped
from .images import UnreadableImage
from .labels import check_annotated
from .records import ParquetRecords, weighted_positions
from .transforms import SampleTransform


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
        check_annotated(
            ", ".join(map(str, files)), self.records.annotated_values, transform.labels_required
        )
        factors = [w for source_files, w in sources for _ in source_files]
        self.units: list[tuple[int, int]] = []
        for i, (file, factor) in enumerate(zip(files, factors, strict=True)):
            groups = pq.read_metadata(file).num_row_groups
            positions = weighted_positions(groups, factor, seed, i)
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

    def _one_pass(
        self, order: np.ndarray, placement: tuple[int, int, int, int], passes: int
    ) -> Generator[dict[str, Any], None, int]:
        """One pass over this worker's row groups; returns how many samples it yielded. An
        image that does not decode is left out and reported with the next sample (`skipped`)."""
        yielded = 0
        skipped: list[Skipped] = []
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
                try:
                    sample = self.transform(record, labels, annotated, rng)
                except UnreadableImage as err:
                    skipped.append((str(record["id"]), str(self.records.files[file]), str(err)))
                    continue
                sample["unit"] = position
                if skipped:
                    sample["skipped"], skipped = skipped, []
                yielded += 1
                yield sample
        return yielded
