"""Training data loading: samples/s in a fully random order against a block-shuffled order.

Reading one row of a Parquet row group costs reading the row group, so the order in which a
map-style dataset is visited decides how often each row group is read. This builds a demo
dataset with 512-px images, then times `MgllDataset[i]` (decode, pad, resize, tokenize) over one
epoch of `GlobalBatchSampler` order with window 0 (uniform permutation, the baseline) and with
block windows, in the same process.

Usage: python benchmarks/data_loading.py [--n 1200] [--windows 2] [--cache 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.demo.nih_release import write_demo_release
from mgll_train.data import SampleTransform, make_dataset
from mgll_train.data import records as parquet_records
from mgll_train.model import create_model
from mgll_train.sampler import GlobalBatchSampler


def epoch_rate(dataset, window: int, batch_size: int = 32) -> tuple[float, int]:
    """Samples/s over one epoch in the sampler's order, and the row-group reads it made."""
    records = dataset.records
    records._cached.clear()
    reads_before = records.row_group_reads
    sampler = GlobalBatchSampler(
        len(dataset), batch_size, row_groups=records.row_groups(), window=window
    )
    order = [i for batch in sampler for i in batch]
    start = time.perf_counter()
    for i in order:
        dataset[i]
    return len(order) / (time.perf_counter() - start), records.row_group_reads - reads_before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1200, help="images in the dataset (1200)")
    parser.add_argument("--windows", default="2", help="block windows to compare (2)")
    parser.add_argument(
        "--cache",
        type=int,
        default=2,
        help="row groups cached per process (2: a corpus far larger than the "
        "cache, as in real training)",
    )
    args = parser.parse_args()
    parquet_records.ROW_GROUP_CACHE = args.cache
    with tempfile.TemporaryDirectory() as tmp:
        raw = write_demo_release(Path(tmp) / "raw", n=args.n, seed=0, image_size=768)
        out = Path(tmp) / "ds"
        build(
            load_pipeline("chestxray14"),
            raw,
            out,
            BuildOptions(image_size=512, workers=2, progress=False),
        )
        bundle = create_model("mgll-tiny")
        transform = SampleTransform.from_model(bundle.model, bundle.tokenizer)
        dataset = make_dataset(str(out), transform, split="train")
        groups = len(set(dataset.records.row_groups().tolist()))
        print(
            f"{len(dataset)} training rows in {groups} row groups, {args.cache} cached; "
            "one epoch, one process"
        )
        base, base_reads = epoch_rate(dataset, 0)
        print(f"   uniform order (baseline): {base:7.1f} samples/s, {base_reads} row-group reads")
        for window in (int(w) for w in args.windows.split(",")):
            rate, reads = epoch_rate(dataset, window)
            print(
                f"   block window {window:3d}:        {rate:7.1f} samples/s, {reads} row-group "
                f"reads, {rate / base:.2f}x the baseline"
            )


if __name__ == "__main__":
    main()
