"""Training image decode + transform per core, the replaced path against the current one, and
the data loader against the training step.

Builds demo datasets of 512-px stored images (PNG and JPEG), then:
1. per core (torch pinned to 1 thread, one process): samples/s of `SampleTransform.image`
   (reduced decode, uint8 out: the consumer normalises on its device) against the path it
   replaced (full decode, one bicubic resize from full resolution, float normalisation on the
   CPU), interleaved ABAB
   over `--rounds` rounds, min / median / max of each and of the per-round ratio;
2. the DataLoader (`--workers`, 1) against the `--loss mgll` training step of `--model` on one
   thread, both in images/s: the loader over `--batches` batches after the prefetched ones,
   the step over `--steps` steps after warm-up. (On a shared machine a step on several threads
   mostly measures the other tenants: one core each is the comparable figure.)

Usage: python benchmarks/loader.py [--n 64] [--size 224] [--rounds 5] [--formats png,jpeg]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from train_throughput import step_rate, time_loader

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.demo.nih_release import write_demo_release
from mgll_train.data import SampleTransform, make_dataset
from mgll_train.data.images import decode_image, decode_scaled, pad_resize, random_crop_box
from mgll_train.model import create_model


class ReplacedTransform(SampleTransform):
    """`SampleTransform` with the image path it replaced (the baseline)."""

    def image(self, data: bytes, rng: np.random.Generator) -> torch.Tensor:
        image = decode_image(data)
        crop = random_crop_box(max(image.size), rng) if self.augment else None
        array = np.asarray(pad_resize(image, self.image_size, crop), dtype=np.float32) / 255.0
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        array = (array - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def build_demo(root: Path, n: int, image_format: str) -> Path:
    """A demo build of `n` images stored at 512 px in `image_format`."""
    raw = root / "raw"
    if not raw.exists():
        write_demo_release(raw, n=n, seed=0, image_size=768)
    out = root / image_format
    options = BuildOptions(image_size=512, image_format=image_format, workers=2, progress=False)
    build(load_pipeline("chestxray14"), raw, out, options)
    return out


def stored_images(build_dir: Path) -> list[bytes]:
    """The image bytes of every row of a build."""
    return [
        row["image"]["bytes"]
        for shard in sorted((build_dir / "data").glob("*.parquet"))
        for row in pq.read_table(shard, columns=["image"]).to_pylist()
    ]


def rate(image: Callable[[bytes, np.random.Generator], torch.Tensor], images: list[bytes]) -> float:
    """Samples/s of `image` over `images` (each with its own seeded generator)."""
    start = time.perf_counter()
    for i, data in enumerate(images):
        image(data, np.random.default_rng(i))
    return len(images) / (time.perf_counter() - start)


def spread(values: list[float]) -> str:
    return f"{min(values):7.1f} / {statistics.median(values):7.1f} / {max(values):7.1f}"


def per_core(images: list[bytes], size: int, rounds: int, augment: bool) -> None:
    """Print the interleaved comparison of the replaced and the current image path, beside the
    decode alone that the current path starts with (its floor)."""
    kwargs = {"tokenizer": None, "image_size": size, "augment": augment}
    norm = {"mean": (0.481, 0.458, 0.408), "std": (0.269, 0.261, 0.276)}  # open_clip's OpenAI
    arms = {
        "replaced path": ReplacedTransform(**kwargs, **norm).image,
        "current path": SampleTransform(**kwargs, **norm).image,
        "its decode alone": lambda data, rng: decode_scaled(data, size),
    }
    for image in arms.values():
        rate(image, images[:4])  # warm caches and imports
    rates: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(rounds):  # ABAB: load drifting over the run hits every arm alike
        for name, image in arms.items():
            rates[name].append(rate(image, images))
    for name, values in rates.items():
        print(f"     {name:17s} {spread(values)} samples/s (min / median / max)")
    old, new = rates["replaced path"], rates["current path"]
    ratios = [n / o for o, n in zip(old, new, strict=True)]
    print(
        f"     current / replaced, per round: {min(ratios):.2f} / "
        f"{statistics.median(ratios):.2f} / {max(ratios):.2f}x"
    )


def loader_against_step(args: argparse.Namespace, build_dir: Path) -> None:
    """Print the loader's images/s beside the training step's, for the replaced and current
    image paths."""
    bundle = create_model(args.model)
    loader_rates = {}
    for name, cls in (("replaced", ReplacedTransform), ("current", SampleTransform)):
        transform = cls.from_model(bundle.model, bundle.tokenizer)
        dataset = make_dataset(str(build_dir), transform, split="train")
        loader_rates[name] = time_loader(dataset, args.batch_size, args.workers, args.batches)
    step_args = argparse.Namespace(
        model=args.model, batch_size=args.batch_size, granularities=3, precision="fp32",
        grad_checkpointing=False, warmup=3, steps=args.steps,
    )  # fmt: skip
    step = step_rate(step_args, "mgll", torch.device("cpu"))
    size = transform.image_size
    print(
        f"   {args.model} ({size} px), batch {args.batch_size}, {args.workers} workers, "
        f"{args.batches} batches timed; mgll step {step:.1f} images/s"
    )
    for name, loader in loader_rates.items():
        print(f"     loader, {name} path: {loader:7.1f} images/s = {loader / step:.2f}x the step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64, help="images per build (64)")
    parser.add_argument("--size", type=int, default=224, help="model input for part 1 (224)")
    parser.add_argument("--rounds", type=int, default=5, help="ABAB rounds (5)")
    parser.add_argument("--formats", default="png,jpeg", help="stored formats (png,jpeg)")
    parser.add_argument("--model", default="mgll-tiny", help="model of part 2 (mgll-tiny)")
    parser.add_argument("--batch-size", type=int, default=32, help="part 2's batch (32)")
    parser.add_argument("--workers", type=int, default=1, help="loader workers (1: a core each)")
    parser.add_argument("--batches", type=int, default=50, help="loader batches timed (50)")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed (10)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores; load average {os.getloadavg()[0]:.2f} at the start")
    with tempfile.TemporaryDirectory() as tmp:
        builds = {f: build_demo(Path(tmp), args.n, f) for f in args.formats.split(",")}
        for fmt, build_dir in builds.items():
            images = stored_images(build_dir)
            for augment in (False, True):
                print(
                    f"1. {len(images)} {fmt} images, 512 px -> {args.size} px, "
                    f"augment={augment}, 1 thread:"
                )
                per_core(images, args.size, args.rounds, augment)
        print(f"2. loader ({args.workers} worker processes) against the step (1 thread):")
        loader_against_step(args, builds[args.formats.split(",")[0]])
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
