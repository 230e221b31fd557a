"""`mgll-train fit` flags (open_clip's names where open_clip has the flag) and `-c/--config`.

A config YAML's keys are flag names (`batch-size` or `batch_size`); the command line overrides
it; the resolved configuration is saved in the run directory.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .reporting import REPORT_CHOICES

GRANULARITIES = ("category", "description", "explanation")


def _weights(text: str) -> tuple[float, float, float]:
    parts = [float(x) for x in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    return parts[0], parts[1], parts[2]


def _granularities(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in GRANULARITIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown granularities {unknown}; use {GRANULARITIES}")
    return names


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `mgll-train fit`."""
    parser.add_argument("-c", "--config", type=Path, help="YAML whose keys are flag names")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--train-data", help="build dir, Parquet files or globs, 'A::B', or hf:org/name"
    )
    data.add_argument(
        "--train-data-upsampling-factors",
        default=None,
        help="weights of the '::'-joined train datasets, e.g. '1::2'",
    )
    data.add_argument("--train-split", default="train", help="value of the split column (train)")
    # --- evaluation during training (issue 5) ---
    data.add_argument("--val-data", default=None, help="dataset evaluated during training")
    data.add_argument("--val-split", default="validation", help="its split (validation)")
    data.add_argument(
        "--val-frequency", type=int, default=1, help="label-aware retrieval every N epochs (1)"
    )
    data.add_argument(
        "--zeroshot-frequency", type=int, default=1, help="zero-shot AUROC every N epochs (1)"
    )
    # --- end evaluation during training ---
    data.add_argument(
        "--streaming",
        action="store_true",
        help="stream row groups (split over processes and workers) instead of random access; "
        "resumes at the next row group",
    )
    data.add_argument(
        "--shuffle-window",
        type=int,
        default=0,
        help="block-shuffle rows within runs of N Parquet row groups (fast "
        "reading of large corpora); 0: a uniform permutation (0)",
    )
    data.add_argument("--workers", type=int, default=2, help="data loader workers per process (2)")
    data.add_argument(
        "--granularities",
        type=_granularities,
        default=GRANULARITIES,
        help="ordered texts to train on (category,description,explanation)",
    )
    data.add_argument(
        "--text-sampling",
        choices=("truncate", "sentences"),
        default="truncate",
        help="cut long texts at the context length, or sample sentences that fit",
    )
    data.add_argument(
        "--uncertain",
        choices=("ignore", "positive", "negative"),
        default="ignore",
        help="what -1 (uncertain) labels become (ignore: not annotated)",
    )
    data.add_argument(
        "--unmentioned",
        choices=("negative", "ignore"),
        default="negative",
        help="what NaN becomes for labels the dataset annotates (negative: 0)",
    )
    data.add_argument(
        "--augment",
        action="store_true",
        help="mild augmentation (small random crop; never a horizontal flip)",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="mgll-tiny", help="open_clip model name (mgll-tiny)")
    model.add_argument("--pretrained", default=None, help="open_clip pretrained tag or path")
    model.add_argument("--lock-image", action="store_true", help="freeze the image tower")
    model.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    model.add_argument("--grad-checkpointing", action="store_true", help="trade compute for memory")
    loss = parser.add_argument_group("loss")
    loss.add_argument("--loss", choices=("mgll", "clip", "mgll-official"), default="mgll")
    loss.add_argument("--soft-target", choices=("jaccard", "overlap", "exact"), default="jaccard")
    loss.add_argument("--pointwise-target", choices=("binary", "graded"), default="binary")
    loss.add_argument(
        "--loss-weights",
        type=_weights,
        default=(1.0, 1.0, 1.0),
        help="weights of the soft contrastive, point-wise and KL terms (1,1,1)",
    )
    loss.add_argument("--local-loss", action="store_true", help="compute only local rows")
    loss.add_argument(
        "--gather-with-grad",
        action="store_true",
        help="gather features with gradients (exact DDP gradients)",
    )
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch-size", type=int, default=32, help="per-process batch size (32)")
    optim.add_argument("--epochs", type=int, default=1)
    optim.add_argument("--lr", type=float, default=5e-4)
    optim.add_argument("--wd", type=float, default=0.2, help="weight decay (0.2)")
    optim.add_argument("--beta1", type=float, default=0.9)
    optim.add_argument("--beta2", type=float, default=0.98)
    optim.add_argument("--eps", type=float, default=1e-6)
    optim.add_argument("--warmup", type=int, default=100, help="warm-up steps (100)")
    optim.add_argument(
        "--precision", choices=("fp32", "amp", "amp_bf16", "amp_bfloat16"), default="fp32"
    )
    optim.add_argument(
        "--accum-freq",
        type=int,
        default=1,
        help="micro-batches per step; the loss spans all of them (1)",
    )
    optim.add_argument(
        "--grad-clip-norm",
        type=float,
        default=None,
        help="clip the gradient norm to this value (off)",
    )
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many optimizer steps (default: all epochs)",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--logs", type=Path, default=Path("logs"), help="runs folder (./logs)")
    run.add_argument("--name", default=None, help="run name (default: from date and settings)")
    run.add_argument("--resume", default=None, help="'latest' or a checkpoint path")
    run.add_argument("--save-frequency", type=int, default=1, help="save every N epochs (1)")
    run.add_argument("--save-every-n-steps", type=int, default=None, help="also save every N steps")
    run.add_argument("--log-every-n-steps", type=int, default=10, help="log every N steps (10)")
    run.add_argument(
        "--report-to",
        choices=REPORT_CHOICES,
        default="auto",
        help="metrics.jsonl always; 'tensorboard' also writes <run>/tensorboard event files, "
        "'auto' (default) does so when the tensorboard package is installed, 'none' never",
    )
    run.add_argument("--device", default="cuda", help="cuda (falls back to cpu) or cpu")


def parse_fit_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse with the `--config` YAML as defaults, so the command line overrides it."""
    known, _ = parser.parse_known_args(argv)
    if known.config is not None:
        if not known.config.is_file():
            parser.error(f"--config {known.config}: file not found")
        with open(known.config, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
        dests = {a.dest for a in parser._actions}
        defaults = {}
        for key, value in values.items():
            dest = str(key).replace("-", "_")
            if dest not in dests:
                parser.error(f"--config {known.config}: unknown key {key!r}")
            action = next(a for a in parser._actions if a.dest == dest)
            if action.type is not None and isinstance(value, str):
                value = action.type(value)
            defaults[dest] = value
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.train_data is None:
        parser.error("--train-data is required (on the command line or in --config)")
    return args


def resolved_config(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration as plain YAML-able values, with flag names as keys."""
    out = {}
    for key, value in sorted(vars(args).items()):
        if key in ("config", "command", "func"):
            continue
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        out[key.replace("_", "-")] = value
    return out
