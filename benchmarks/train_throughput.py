"""Training throughput: images/s of a step with `--loss clip` and with `--loss mgll`, same texts.

Both losses run on the same model, batch, granularities and precision, in the same process, on
synthetic inputs (random images, tokenized report-like texts, realistic label vectors), so the
ratio isolates what the MGLL objective costs on top of the G text-tower passes. Optionally the
data loader alone is timed on a built dataset (`--data`), to check that it outruns the step.

The issue's target (GPU): ViT-B-16, batch 256, amp_bf16, three granularities, MGLL at most 3 %
slower than CLIP:
    python benchmarks/train_throughput.py --model ViT-B-16 --batch-size 256 \\
        --precision amp_bf16 --device cuda --data demo-out --workers 8
On a CPU, with the shipped tiny model:
    python benchmarks/train_throughput.py --model mgll-tiny --batch-size 64 --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import suppress

import torch
from open_clip_train.precision import get_autocast
from torch.utils.data import DataLoader, Dataset, RandomSampler

from mgll_train.data import SampleTransform, collate, make_dataset
from mgll_train.loss import MGLLLoss, text_ids_for
from mgll_train.model import create_model
from mgll_train.train import FeatureModel, _train_step

TEXTS = [
    "Cardiomegaly, Pleural Effusion",
    "No Finding",
    "Mild cardiomegaly with small bilateral pleural effusions.",
    "The heart is enlarged. Blunting of both costophrenic angles.",
]


def _synthetic_batch(bundle, batch_size: int, image_size: int, granularities: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    texts = [
        [TEXTS[(b + g) % len(TEXTS)] + f" ({b % 7})" for b in range(batch_size)]
        for g in range(granularities)
    ]
    labels = (torch.rand(batch_size, 21, generator=generator) < 0.1).float()
    return {
        "images": torch.randint(
            0, 256, (batch_size, 3, image_size, image_size), generator=generator, dtype=torch.uint8
        ),
        "texts": torch.stack([bundle.tokenizer(t) for t in texts]),
        "labels": labels,
        "text_ids": text_ids_for(texts),
    }


def step_rate(args: argparse.Namespace, loss: str, device: torch.device) -> float:
    """Images/s of full training steps (forward, loss, backward, AdamW) with `loss`."""
    torch.manual_seed(0)
    bundle = create_model(
        args.model, device=device, init_logit_bias=-10.0, grad_checkpointing=args.grad_checkpointing
    )
    size = bundle.preprocess_cfg["size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    batch = _synthetic_batch(bundle, args.batch_size, size, args.granularities)
    model = FeatureModel(bundle.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "amp" else None
    autocast = get_autocast(args.precision, device_type=device.type) or suppress
    loss_fn = MGLLLoss(mode=loss)
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        _train_step(model, loss_fn, optimizer, scaler, autocast, batch, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return args.batch_size / statistics.median(times)


def loader_rate(args: argparse.Namespace) -> float:
    """Images/s of the data loader alone (decode, pad, resize, tokenize, collate)."""
    bundle = create_model(args.model)
    transform = SampleTransform.from_model(bundle.model, bundle.tokenizer)
    dataset = make_dataset(args.data, transform, split="train")
    return time_loader(dataset, args.batch_size, args.workers, args.loader_batches)


def time_loader(dataset: Dataset, batch_size: int, workers: int, batches: int = 50) -> float:
    """Images/s of a DataLoader over `dataset`, timed over `batches` batches at steady state.

    Rows are drawn with replacement, so a small build serves any number of batches. Timing
    starts once the batches the workers prefetched while starting (2 per worker) have been
    drawn: from then on every batch timed was produced while the clock ran.
    """
    warmup = 2 * max(workers, 1) + 2
    sampler = RandomSampler(
        dataset,
        replacement=True,
        num_samples=(warmup + batches) * batch_size,
        generator=torch.Generator().manual_seed(0),
    )
    loader = DataLoader(
        dataset, batch_size, sampler=sampler, num_workers=workers, collate_fn=collate
    )
    start = 0.0
    for k, _ in enumerate(loader):
        if k == warmup - 1:
            start = time.perf_counter()
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mgll-tiny")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--granularities", type=int, default=3)
    parser.add_argument(
        "--precision", default="fp32", choices=("fp32", "amp", "amp_bf16", "amp_bfloat16")
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--data", default=None, help="a built dataset for the loader alone")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--loader-batches", type=int, default=50, help="batches timed after warm-up (50)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"{args.model}, batch {args.batch_size}, {args.granularities} granularities, "
        f"{args.precision}, {device}"
    )
    rates = {}
    for loss in ("clip", "mgll", "clip", "mgll"):  # interleaved: drift hits both alike
        rates.setdefault(loss, []).append(step_rate(args, loss, device))
    clip, mgll = max(rates["clip"]), max(rates["mgll"])
    print(f"   --loss clip: {clip:8.1f} images/s")
    print(
        f"   --loss mgll: {mgll:8.1f} images/s  ({100 * (clip / mgll - 1):+.1f} % step time "
        "against clip; target <= +3 % on a GPU)"
    )
    if args.data:
        rate = loader_rate(args)
        print(
            f"   data loader alone ({args.workers} workers, {args.loader_batches} batches after "
            f"warm-up): {rate:8.1f} images/s ({rate / mgll:.2f}x the mgll step)"
        )


if __name__ == "__main__":
    main()
