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

from .choices import (
    DENSE_LOSS_NAMES,
    LOSS_NAMES,
    POINTWISE_TARGETS,
    SOFT_TARGETS,
    TEXT_SAMPLINGS,
    UNCERTAIN_POLICIES,
    UNMENTIONED_POLICIES,
)
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


class HelpFormatter(argparse.HelpFormatter):
    """`--help` that ends each flag's text with its default (or "off" for a switch), unless
    the text already says what happens by default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "default" in text or action.required:
            return text
        if action.default is False:
            return f"{text} (default: off)"
        if action.default in (None, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `mgll-train fit`."""
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        help="YAML file of flag values, keyed by flag name (batch-size or batch_size); the "
        "command line overrides it (default: none)",
    )
    required = parser.add_argument_group("required arguments")
    required.add_argument(
        "--train-data",
        help="training data: a build folder, Parquet files or globs, several joined with '::', "
        "or hf:org/name from the local Hub cache (required: on the command line or in --config)",
    )
    _data_arguments(parser.add_argument_group("data"))
    _model_arguments(parser.add_argument_group("model"))
    _loss_arguments(parser.add_argument_group("loss"))
    _optimisation_arguments(parser.add_argument_group("optimisation"))
    _run_arguments(parser.add_argument_group("run"))


def _data_arguments(data: argparse._ArgumentGroup) -> None:
    data.add_argument(
        "--train-data-upsampling-factors",
        default=None,
        help="sampling weights of the '::'-joined --train-data datasets, e.g. '1::2' "
        "(default: each dataset once)",
    )
    data.add_argument(
        "--train-split", default="train", help="train on the rows whose split column is this"
    )
    _validation_arguments(data)
    data.add_argument(
        "--streaming",
        action="store_true",
        help="stream row groups (split over processes and workers) instead of random access; "
        "resumes at the next row group",
    )
    data.add_argument(
        "--shuffle-window",
        type=non_negative_int,
        default=0,
        help="block-shuffle rows within runs of N Parquet row groups (fast reading of large "
        "corpora); 0: a uniform permutation",
    )
    data.add_argument(
        "--workers", type=non_negative_int, default=2, help="data loader workers per process"
    )
    data.add_argument(
        "--max-bad-samples",
        type=non_negative_int,
        default=100,
        help="images that fail to decode are skipped (the next row takes their place) with a "
        "warning naming the record; the run stops once a process has skipped more than N "
        "distinct records (0: stop at the first)",
    )
    data.add_argument(
        "--granularities",
        type=_granularities,
        default=",".join(GRANULARITIES),
        help="the texts to train on, in order, comma-separated",
    )
    data.add_argument(
        "--text-sampling",
        choices=TEXT_SAMPLINGS,
        default="truncate",
        help="truncate: cut long texts at the context length; sentences: sample whole "
        "sentences that fit",
    )
    data.add_argument(
        "--uncertain",
        choices=UNCERTAIN_POLICIES,
        default="ignore",
        help="what -1 (uncertain) labels become; ignore: not annotated",
    )
    data.add_argument(
        "--unmentioned",
        choices=UNMENTIONED_POLICIES,
        default="negative",
        help="what NaN becomes for the labels a dataset annotates; negative: 0",
    )
    data.add_argument(
        "--augment",
        action="store_true",
        help="mild augmentation (small random crop; never a horizontal flip)",
    )


def _validation_arguments(data: argparse._ArgumentGroup) -> None:
    """Evaluation during training: the `eval` metrics on --val-data, into metrics.jsonl."""
    data.add_argument(
        "--val-data",
        default=None,
        help="dataset evaluated after epochs, into metrics.jsonl (default: none)",
    )
    data.add_argument("--val-split", default="validation", help="the split of --val-data to use")
    data.add_argument(
        "--val-frequency",
        type=non_negative_int,
        default=1,
        help="label-aware retrieval on --val-data every N epochs (0: never)",
    )
    data.add_argument(
        "--zeroshot-frequency",
        type=non_negative_int,
        default=1,
        help="zero-shot AUROC on --val-data every N epochs (0: never)",
    )


def _model_arguments(model: argparse._ArgumentGroup) -> None:
    model.add_argument("--model", default="mgll-tiny", help="open_clip model name")
    model.add_argument(
        "--pretrained",
        default=None,
        help="open_clip pretrained tag or a checkpoint path (default: random weights)",
    )
    model.add_argument("--lock-image", action="store_true", help="freeze the image tower")
    model.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    model.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass: less memory, more compute",
    )


def _loss_arguments(loss: argparse._ArgumentGroup) -> None:
    loss.add_argument(
        "--loss",
        choices=LOSS_NAMES,
        default="mgll",
        help="mgll: soft multi-label targets, a point-wise term and a cross-granularity KL; "
        "clip: the CLIP baseline on the same texts; mgll-official: the reference code's "
        "arithmetic; mgca: MGCA's instance, token and prototype alignment on --report-text; "
        "g2d: CLIP on --report-text plus G2D's pseudo-segmentation (ViT models)",
    )
    loss.add_argument(
        "--soft-target",
        choices=SOFT_TARGETS,
        default="jaccard",
        help="category targets of two images: jaccard: |shared positive labels| / |all "
        "positive labels|; overlap: 1 when they share one; exact: 1 when the texts are equal",
    )
    loss.add_argument(
        "--pointwise-target",
        choices=POINTWISE_TARGETS,
        default="binary",
        help="point-wise term's target of a pair: binary: 1 when the soft target is > 0; "
        "graded: the soft target itself",
    )
    loss.add_argument(
        "--loss-weights",
        type=_weights,
        default="1,1,1",
        help="weights of the soft contrastive, point-wise and KL terms",
    )
    loss.add_argument(
        "--local-loss",
        action="store_true",
        help="each process computes the loss of its own rows against the global batch",
    )
    loss.add_argument(
        "--gather-with-grad",
        action="store_true",
        help="gather features with gradients (exact DDP gradients)",
    )
    _token_loss_arguments(loss)


def _token_loss_arguments(loss: argparse._ArgumentGroup) -> None:
    """Flags of the token-level objectives (--loss mgca, g2d; --dense-loss g2d)."""
    loss.add_argument(
        "--dense-loss",
        choices=DENSE_LOSS_NAMES,
        default="none",
        help="a dense task added to --loss: g2d: G2D's pseudo-segmentation of the image tower's "
        "attention (e.g. --loss mgll --dense-loss g2d); none: no dense task",
    )
    loss.add_argument(
        "--g2d-start-step",
        type=non_negative_int,
        default=200,
        help="the optimizer step (from 0) at which G2D's dense term switches on",
    )
    loss.add_argument(
        "--report-text",
        default="description+explanation",
        help="--loss mgca/g2d: the granularities joined into one report text per image, "
        "'+'-separated (each must be in --granularities)",
    )
    loss.add_argument(
        "--mgca-weights",
        type=_weights,
        default="1,1,1",
        help="--loss mgca: weights of the instance, token and prototype terms",
    )
    loss.add_argument(
        "--mgca-temperatures",
        type=_weights,
        default="0.07,0.1,0.2",
        help="--loss mgca: temperatures of the instance, token and prototype terms",
    )
    loss.add_argument(
        "--mgca-prototypes",
        type=positive_int,
        default=500,
        help="--loss mgca: number of prototypes",
    )
    loss.add_argument(
        "--mgca-freeze-prototype-epochs",
        type=non_negative_int,
        default=1,
        help="--loss mgca: epochs at the start during which the prototypes are not trained",
    )


def _optimisation_arguments(optim: argparse._ArgumentGroup) -> None:
    optim.add_argument("--batch-size", type=positive_int, default=32, help="per-process batch size")
    optim.add_argument(
        "--epochs", type=int, default=1, help="passes over the training data (at least 1)"
    )
    optim.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW)")
    optim.add_argument("--wd", type=float, default=0.2, help="weight decay")
    optim.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    optim.add_argument("--beta2", type=float, default=0.98, help="AdamW beta2")
    optim.add_argument("--eps", type=float, default=1e-6, help="AdamW epsilon")
    optim.add_argument(
        "--warmup",
        type=non_negative_int,
        default=100,
        help="steps of linear warm-up before the cosine decay",
    )
    optim.add_argument(
        "--precision",
        choices=("fp32", "amp", "amp_bf16", "amp_bfloat16"),
        default="fp32",
        help="fp32; amp: float16 autocast with loss scaling; amp_bf16 (amp_bfloat16): "
        "bfloat16 autocast",
    )
    optim.add_argument(
        "--accum-freq",
        type=positive_int,
        default=1,
        help="micro-batches per step; the loss spans all of them",
    )
    optim.add_argument(
        "--grad-clip-norm",
        type=float,
        default=None,
        help="clip the gradient norm to this value (default: no clipping)",
    )
    optim.add_argument(
        "--seed", type=int, default=0, help="seed of the initialisation, sampling and shuffles"
    )
    optim.add_argument(
        "--max-steps",
        type=non_negative_int,
        default=None,
        help="stop after this many optimizer steps (default: all epochs)",
    )


def _run_arguments(run: argparse._ArgumentGroup) -> None:
    run.add_argument("--logs", type=Path, default=Path("logs"), help="folder of the runs")
    run.add_argument(
        "--name", default=None, help="run name (default: from the date and main settings)"
    )
    run.add_argument(
        "--resume",
        default=None,
        help="continue the run --name from 'latest' or a checkpoint path (default: a fresh run)",
    )
    run.add_argument(
        "--save-frequency", type=positive_int, default=1, help="save a checkpoint every N epochs"
    )
    run.add_argument(
        "--save-every-n-steps",
        type=positive_int,
        default=None,
        help="also save a checkpoint every N steps (default: never)",
    )
    run.add_argument(
        "--log-every-n-steps",
        type=positive_int,
        default=10,
        help="a loss line in out.log and metrics.jsonl every N steps (and the first)",
    )
    run.add_argument(
        "--report-to",
        choices=REPORT_CHOICES,
        default="auto",
        help="metrics.jsonl always; tensorboard: also <run>/tensorboard event files; auto: so "
        "when the tensorboard package is installed; none: never",
    )
    run.add_argument(
        "--device",
        default="cuda",
        help="torch device; cuda falls back to the CPU, with a warning, where no GPU is available",
    )
    run.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (one is drawn only when stderr is a terminal)",
    )


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
