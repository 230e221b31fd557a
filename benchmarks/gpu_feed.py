"""Does the loader feed a GPU, and what does MGLL cost there? One prepared run, one table.

On one GPU with its CPU cores (written for an H200 with 16 cores; under 8 minutes), from a demo
build made on the spot (`--n` images stored at 512 px, built with `--workers` processes):

(a) step time of `--loss clip` against `--loss mgll` (3 granularities), same batches, ViT-B-16
    from random weights, batch 256, bf16 autocast; the two interleaved over 5 rounds of 10
    steps (synchronised only at a round's ends), min / median / max per step and
    of the per-round ratio (target: mgll / clip <= 1.03);
(b) the loader alone (`--workers` processes, pinned uint8 batches) against the step, in
    samples/s (target: >= 1.5x), and the two together: the loader feeding the step, as `fit`
    runs;
(c) peak GPU memory during each loss's rounds (the model and both arms' optimizer states
    included);
(d) mgll-train's step (`--loss clip`, one granularity) against open_clip's own training step
    (`open_clip_train.train.train_one_epoch` with its `ClipLoss`, fed the float32 batches
    open_clip's loaders produce) on the same rows, interleaved (target: >= 0.97x its samples/s).

Usage:
    python benchmarks/gpu_feed.py            # the GPU run (cuda, ViT-B-16, batch 256, bf16)
    python benchmarks/gpu_feed.py --smoke    # CPU check of the script, tiny sizes (13 s of CPU)

On the lent device machine (its image has Python 3.12, torch, torchvision, pyarrow, Pillow,
pandas, timm and numpy 2; nothing can be downloaded there), what the project imports and the
image lacks travels as wheels with the working tree. Compared with the image's package list
(device KINDS.md, 2026-11-17), that is open_clip_torch==3.3.0 ftfy wcwidth datasets==5.2.0 dill
multiprocess pydicom==3.0.2 python-gdcm==3.2.6 pylibjpeg==2.1.0 pylibjpeg-libjpeg
pylibjpeg-openjpeg pylibjpeg-rle (the last four in releases built for numpy 2). Here,
`echo /.whl/ >> .git/info/exclude`, then `python3 -m pip download --no-deps
--only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl NAME...`;
run with carry [".whl"] and the command `python3 -m pip install -q --no-index --no-deps
--target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3
benchmarks/gpu_feed.py` (timeout 540 s; a module still missing is named by the first error).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()  # the whole run counts torch's import (seconds on a busy CPU)

import torch  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402

from mgll_data.build.engine import BuildOptions, build  # noqa: E402
from mgll_data.build.pipeline import load_pipeline  # noqa: E402
from mgll_data.demo.nih_release import write_demo_release  # noqa: E402
from mgll_train.data import SampleTransform, collate, make_dataset  # noqa: E402
from mgll_train.data.normalize import model_input  # noqa: E402
from mgll_train.loss import MGLLLoss  # noqa: E402
from mgll_train.model import create_model  # noqa: E402
from mgll_train.train import FeatureModel, _train_step  # noqa: E402

GPU = {"model": "ViT-B-16", "batch_size": 256, "precision": "amp_bf16", "n": 512, "raw": 768,
       "stored": 512, "rounds": 5, "steps": 10, "loader_batches": 20}  # fmt: skip
SMOKE = {"model": "mgll-tiny", "batch_size": 8, "precision": "fp32", "n": 24, "raw": 160,
         "stored": 128, "rounds": 2, "steps": 2, "loader_batches": 3}  # fmt: skip


def spread(values: list[float], unit: str = "", digits: int = 1) -> str:
    """``min / median / max`` of ``values``."""
    parts = (min(values), statistics.median(values), max(values))
    return " / ".join(f"{v:.{digits}f}" for v in parts) + unit


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_demo(root: Path, cfg: dict[str, Any], workers: int) -> tuple[Path, float, float]:
    """A demo build of ``cfg["n"]`` images stored at ``cfg["stored"]`` px; the seconds the
    release took to generate (one process) and to build (``workers`` processes)."""
    start = time.perf_counter()
    raw = write_demo_release(root / "raw", n=cfg["n"], seed=0, image_size=cfg["raw"])
    generated = time.perf_counter()
    options = BuildOptions(image_size=cfg["stored"], workers=workers, progress=False)
    build(load_pipeline("chestxray14"), raw, root / "ds", options)
    return root / "ds", generated - start, time.perf_counter() - generated


def fixed_batches(dataset: Any, batch_size: int, count: int, pin: bool) -> list[dict[str, Any]]:
    """``count`` batches of distinct rows (rows repeat across batches when the build is small),
    collated as the loader does, pinned for a CUDA device."""
    n = len(dataset)
    batches = []
    for k in range(count):
        rows = [(k * batch_size + i) % n for i in range(batch_size)]
        batch = collate([dataset[i] for i in rows])
        batches.append({k: v.pin_memory() if pin and torch.is_tensor(v) else v
                        for k, v in batch.items()})  # fmt: skip
    return batches


def one_granularity(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with its first granularity (the category) alone: what open_clip trains on."""
    return batch | {"texts": batch["texts"][:1], "text_ids": batch["text_ids"][:1]}


class MgllArm:
    """mgll-train's step (`_train_step`, as `fit` calls it) with one loss."""

    def __init__(self, clip: torch.nn.Module, loss: str, precision: str, device: torch.device):
        from open_clip_train.precision import get_autocast

        self.model = FeatureModel(clip)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.autocast = get_autocast(precision, device_type=device.type)
        self.loss_fn = MGLLLoss(mode=loss)
        self.device = device

    def run(self, batches: list[dict[str, Any]], steps: int) -> None:
        for s in range(steps):
            _train_step(self.model, self.loss_fn, self.optimizer, None, self.autocast,
                        batches[s % len(batches)], self.device)  # fmt: skip


class OpenClipArm:
    """open_clip's own training loop (`train_one_epoch`, its `ClipLoss`) over float32 batches."""

    def __init__(self, clip: torch.nn.Module, batches: list[dict[str, Any]], args: Any):
        import open_clip

        self.clip = clip
        self.optimizer = torch.optim.AdamW(clip.parameters(), lr=1e-5)
        self.loss = open_clip.ClipLoss()
        self.args = args
        # What open_clip's loaders hand over: float32 normalised images, one text row each.
        self.pairs = [(model_input(b["images"], clip, "cpu"), b["texts"][0]) for b in batches]
        if args.device.startswith("cuda"):
            self.pairs = [(i.pin_memory(), t.pin_memory()) for i, t in self.pairs]

    def run(self, steps: int) -> None:
        from open_clip_train.train import train_one_epoch

        loader = _Epoch([self.pairs[s % len(self.pairs)] for s in range(steps)], self.args)
        self.clip.output_dict = True
        train_one_epoch(self.clip, {"train": loader}, self.loss, 0, self.optimizer, None,
                        None, None, self.args)  # fmt: skip


class _Epoch:
    """The `data["train"]` that `train_one_epoch` reads: a dataloader of given batches."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], args: Any):
        self.dataloader = _Batches(pairs)
        self.dataloader.num_samples = len(pairs) * args.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Nothing to reseed."""


class _Batches(list):
    """A list of batches with the attributes open_clip's loaders carry."""

    @property
    def num_batches(self) -> int:
        return len(self)


def timed_rounds(
    arms: dict[str, Callable[[], None]], rounds: int, steps: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per step of each arm in every round (arms interleaved, after one warm-up call
    each), and each arm's peak device memory in bytes (0 off CUDA)."""
    per_step: dict[str, list[float]] = {name: [] for name in arms}
    peak = dict.fromkeys(arms, 0)
    for run in arms.values():
        run()  # warm-up: kernels chosen, allocator grown, optimizer state created
    for _ in range(rounds):
        for name, run in arms.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            per_step[name].append((time.perf_counter() - start) / steps)
            if device.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))
    return per_step, peak


def loader_batches(dataset: Any, batch_size: int, workers: int, pin: bool) -> Iterator[dict]:
    """Endless pinned batches of random rows (with replacement: a small build serves any
    number), as `fit`'s loader makes them."""
    sampler = RandomSampler(dataset, replacement=True, num_samples=10**9,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    loader = DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=collate, pin_memory=pin)  # fmt: skip
    return iter(loader)


def loader_rate(batches: Iterator[dict], count: int, batch_size: int, workers: int) -> float:
    """Samples/s of the loader alone, after the batches prefetched while it started."""
    for _ in range(2 * max(workers, 1) + 2):
        next(batches)
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    return count * batch_size / (time.perf_counter() - start)


def fed_rate(arm: MgllArm, batches: Iterator[dict], count: int, batch_size: int) -> float:
    """Samples/s of the step fed by the loader (what `fit` gets)."""
    arm.run([next(batches)], 1)
    synchronize(arm.device)
    start = time.perf_counter()
    for _ in range(count):
        arm.run([next(batches)], 1)
    synchronize(arm.device)
    return count * batch_size / (time.perf_counter() - start)


def open_clip_args(cfg: dict[str, Any], device: torch.device) -> argparse.Namespace:
    """The options `train_one_epoch` reads, as open_clip's defaults for one process."""
    return argparse.Namespace(
        device=str(device), precision=cfg["precision"], distill=False, accum_freq=1,
        skip_scheduler=True, grad_clip_norm=None, horovod=False, log_every_n_steps=10**9,
        batch_size=cfg["batch_size"], world_size=1, rank=0, local_rank=0, wandb=False,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model and sizes")
    parser.add_argument("--workers", type=int, default=None, help="loader and build processes "
                        "(the cores this process may use; 2 with --smoke)")  # fmt: skip
    parser.add_argument("--n", type=int, default=None, help="images in the demo build (512)")
    args = parser.parse_args()
    cfg = dict(SMOKE if args.smoke else GPU)
    cfg["n"] = args.n or cfg["n"]
    workers = args.workers or (2 if args.smoke else len(os.sched_getaffinity(0)))
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke on a CPU")
    rows: list[tuple[str, str, str]] = []
    print(f"{cfg['model']}, batch {cfg['batch_size']}, {cfg['precision']}, {device}; "
          f"{workers} workers; load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        builders = 1 if args.smoke else workers  # tiny builds: a process pool costs more
        data, gen_s, build_s = build_demo(Path(tmp), cfg, builders)
        rows.append((f"demo: generate {cfg['n']} images (1 process) / build at "
                     f"{cfg['stored']} px ({builders} processes)", f"{gen_s:.1f} / {build_s:.1f} s",
                     ""))  # fmt: skip
        measure(cfg, data, workers, device, rows)
    rows.append(("whole run", f"{time.perf_counter() - STARTED:.0f} s", "< 480 s"))
    print_table(rows)


def measure(
    cfg: dict[str, Any], data: Path, workers: int, device: torch.device, rows: list
) -> None:
    """Parts (a)-(d), appended to ``rows`` as (measure, value, target)."""
    torch.manual_seed(0)
    bundle = create_model(cfg["model"], device=device)
    transform = SampleTransform.from_model(bundle.model, bundle.tokenizer)
    dataset = make_dataset(str(data), transform, split="train")
    pin, b, steps = device.type == "cuda", cfg["batch_size"], cfg["steps"]
    batches = fixed_batches(dataset, b, 2, pin)
    arms = {
        loss: MgllArm(bundle.model, loss, cfg["precision"], device) for loss in ("clip", "mgll")
    }
    times, peak = timed_rounds({k: (lambda a=a: a.run(batches, steps)) for k, a in arms.items()},
                               cfg["rounds"], steps, device)  # fmt: skip
    ratios = [m / c for c, m in zip(times["clip"], times["mgll"], strict=True)]
    rows += [
        ("(a) step --loss clip, s (min / median / max)", spread(times["clip"], digits=4), ""),
        ("(a) step --loss mgll, 3 granularities, s", spread(times["mgll"], digits=4), ""),
        ("(a) mgll / clip step time, per round", spread(ratios, "x", 3), "<= 1.03x"),
        ("(c) peak GPU memory in clip / mgll rounds, GiB",
         f"{peak['clip'] / 2**30:.2f} / {peak['mgll'] / 2**30:.2f}" if pin else "n/a (CPU)", ""),
    ]  # fmt: skip
    step_rate = b / statistics.median(times["mgll"])
    stream = loader_batches(dataset, b, workers, pin)
    loader = loader_rate(stream, cfg["loader_batches"], b, workers)
    fed = fed_rate(arms["mgll"], stream, cfg["loader_batches"], b)
    rows += [
        (f"(b) loader alone, {workers} workers, samples/s", f"{loader:.0f}", ""),
        ("(b) step --loss mgll alone, samples/s", f"{step_rate:.0f}", ""),
        ("(b) loader / step", f"{loader / step_rate:.2f}x", ">= 1.5x"),
        ("(b) step fed by the loader, samples/s", f"{fed:.0f} ({fed / step_rate:.2f}x alone)", ""),
    ]  # fmt: skip
    del arms, stream
    compare_open_clip(cfg, dataset, batches, device, rows)


def compare_open_clip(
    cfg: dict[str, Any], dataset: Any, batches: list[dict], device: torch.device, rows: list
) -> None:
    """Part (d): the same rows through open_clip's loop and mgll-train's, one granularity."""
    torch.manual_seed(0)
    clip = create_model(cfg["model"], device=device, init_logit_bias=None).model  # ClipLoss
    single = [one_granularity(b) for b in batches]
    ours = MgllArm(clip, "clip", cfg["precision"], device)
    theirs = OpenClipArm(clip, batches, open_clip_args(cfg, device))
    steps = cfg["steps"]
    arms = {"open_clip": lambda: theirs.run(steps), "mgll": lambda: ours.run(single, steps)}
    times, _ = timed_rounds(arms, cfg["rounds"], steps, device)
    ratios = [o / m for o, m in zip(times["open_clip"], times["mgll"], strict=True)]
    rows += [
        ("(d) open_clip train_one_epoch step, s", spread(times["open_clip"], digits=4), ""),
        ("(d) mgll-train step, --loss clip, s", spread(times["mgll"], digits=4), ""),
        ("(d) mgll / open_clip samples/s, per round", spread(ratios, "x", 3), ">= 0.97x"),
    ]


def print_table(rows: list[tuple[str, str, str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print()
    for r in [("measure", "value", "target"), *rows]:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


if __name__ == "__main__":
    main()
