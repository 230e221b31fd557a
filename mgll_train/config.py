"""`mgll-train fit` flags (open_clip's names where open_clip has the flag) and `-c/--config`.

A config YAML's keys are flag names (`batch-size` or `batch_size`); the command line overrides
it; the resolved configuration is saved in the run directory.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mgll_data.record import GRANULARITIES

from .data.labels import UNCERTAIN_POLICIES, UNMENTIONED_POLICIES
from .data.transforms import TEXT_SAMPLINGS
from .errors import UserError
from .reporting import REPORT_CHOICES


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (a batch size, a count)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of at least 0 (loader workers: 0 reads in this process)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _weights(text: str) -> tuple[float, float, float]:
    """`--loss-weights a,b,c`: three finite numbers."""
    parts = [float(x) for x in text.split(",")]
    if len(parts) != 3 or not all(math.isfinite(p) for p in parts):
        raise argparse.ArgumentTypeError(
            f"expected three finite comma-separated numbers, got {text!r}"
        )
    return parts[0], parts[1], parts[2]


def _granularities(text: str) -> tuple[str, ...]:
    """`--granularities a,b`: known granularity names, in the order given."""
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
    # Evaluation during training (the `eval` metrics on --val-data, into metrics.jsonl).
    data.add_argument("--val-data", default=None, help="dataset evaluated during training")
    data.add_argument("--val-split", default="validation", help="its split (validation)")
    data.add_argument(
        "--val-frequency", type=int, default=1, help="label-aware retrieval every N epochs (1)"
    )
    data.add_argument(
        "--zeroshot-frequency", type=int, default=1, help="zero-shot AUROC every N epochs (1)"
    )
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
    data.add_argument(
        "--workers", type=non_negative_int, default=2, help="data loader workers per process (2)"
    )
    data.add_argument(
        "--granularities",
        type=_granularities,
        default=GRANULARITIES,
        help="ordered texts to train on (category,description,explanation)",
    )
    data.add_argument(
        "--text-sampling",
        choices=TEXT_SAMPLINGS,
        default="truncate",
        help="cut long texts at the context length, or sample sentences that fit",
    )
    data.add_argument(
        "--uncertain",
        choices=UNCERTAIN_POLICIES,
        default="ignore",
        help="what -1 (uncertain) labels become (ignore: not annotated)",
    )
    data.add_argument(
        "--unmentioned",
        choices=UNMENTIONED_POLICIES,
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
    optim.add_argument(
        "--batch-size", type=positive_int, default=32, help="per-process batch size (32)"
    )
    optim.add_argument("--epochs", type=int, default=1, help="passes over the training data (1)")
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
        parser.set_defaults(**_config_defaults(parser, known.config))
    args = parser.parse_args(argv)
    if args.train_data is None:
        parser.error("--train-data is required (on the command line or in --config)")
    if args.epochs < 1:  # checked here, not by argparse, so a --config value is checked too
        raise UserError(
            f"--epochs must be a positive integer, got {args.epochs}: nothing would be trained"
        )
    return args


def _config_defaults(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """The `--config` YAML as parser defaults; a bad file, key or value is a parser error.

    Values are checked as the command line would check them (the flag's type and choices),
    since argparse checks neither for defaults.
    """
    if not path.is_file():
        parser.error(f"--config {path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        parser.error(f"--config {path}: not valid YAML ({err})".replace("\n", " "))
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values")
    actions = {a.dest: a for a in reversed(parser._actions)}  # the first action of a dest
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None:
            parser.error(f"--config {path}: unknown key {key!r}")
        if action.type is not None and isinstance(value, str):
            try:
                value = action.type(value)
            except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
                parser.error(f"--config {path}: {key}: {err}")
        if action.choices is not None and value not in action.choices:
            parser.error(f"--config {path}: {key}: {value!r} is not one of {list(action.choices)}")
        defaults[dest] = value
    return defaults


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
