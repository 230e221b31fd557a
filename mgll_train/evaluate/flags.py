"""The flags of `mgll-train eval` and the task names; torch-free, so `--help` and argument
errors answer before torch loads."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..choices import UNCERTAIN_POLICIES, UNMENTIONED_POLICIES
from ..config import non_negative_int, positive_int

TASKS = ("zeroshot", "linear-probe", "retrieval")
# Per-label AUROC on fewer positives or negatives than this is marked as low support.
MIN_SUPPORT = 5


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `mgll-train eval`."""
    required = parser.add_argument_group("required arguments")
    required.add_argument(
        "--checkpoint", type=Path, required=True, help="a .pt checkpoint written by fit"
    )
    required.add_argument(
        "--data",
        required=True,
        help="dataset to evaluate on: a build folder, Parquet files or globs, or hf:org/name",
    )
    required.add_argument(
        "--out", type=Path, required=True, help="folder for metrics.json, table.txt and plots"
    )
    parser.add_argument("--split", default="test", help="the split of --data to evaluate")
    parser.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help="comma-separated tasks to run",
    )
    parser.add_argument(
        "--train-data",
        default=None,
        help="linear-probe training data (default: the checkpoint's training data)",
    )
    parser.add_argument(
        "--train-split",
        default=None,
        help="the split of the linear-probe training data (default: the checkpoint's, train)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=64, help="images per forward pass"
    )
    parser.add_argument("--workers", type=non_negative_int, default=2, help="data loader workers")
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device; cuda falls back to the CPU, with a warning, where no GPU is available",
    )
    parser.add_argument(
        "--bootstrap",
        type=non_negative_int,
        default=1000,
        help="bootstrap resamples of the 95 %% intervals (0: no intervals)",
    )
    parser.add_argument(
        "--min-support",
        type=non_negative_int,
        default=MIN_SUPPORT,
        help="a label's zero-shot AUROC on fewer positives or negatives than this is marked "
        "low support (*) and left out of the 'macro, supported' mean; the plain macro keeps it",
    )
    _scoring_arguments(parser)
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (one is drawn only when stderr is a terminal)",
    )


def _scoring_arguments(parser: argparse.ArgumentParser) -> None:
    """How labels are read and the probe is trained."""
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the bootstrap, probe subsets and heads"
    )
    parser.add_argument(
        "--uncertain",
        choices=UNCERTAIN_POLICIES,
        default="ignore",
        help="what -1 labels become; ignore: left out of that label's scores",
    )
    parser.add_argument(
        "--unmentioned",
        choices=UNMENTIONED_POLICIES,
        default="ignore",
        help="what NaN labels become; ignore: left out of that label's scores",
    )
    parser.add_argument(
        "--probe-epochs", type=positive_int, default=50, help="epochs of the linear probe"
    )
    parser.add_argument(
        "--probe-lr", type=float, default=1e-3, help="learning rate of the linear head"
    )
    parser.add_argument(
        "--finetune",
        action="store_true",
        help="fine-tune the image tower with the head instead of a linear probe",
    )
    parser.add_argument(
        "--finetune-lr", type=float, default=1.25e-4, help="learning rate of --finetune"
    )
