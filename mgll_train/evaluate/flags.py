"""The flags of `mgll-train eval` and the task names; torch-free, so `--help` and argument
errors answer before torch loads."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..choices import UNCERTAIN_POLICIES, UNMENTIONED_POLICIES
from ..config import non_negative_int, positive_int
from .protocols import PROTOCOLS, SUITES

TASKS = ("zeroshot", "linear-probe", "retrieval", "segmentation")
# What `--tasks` runs by default: the tasks every build supports (segmentation needs masks).
DEFAULT_TASKS = ("zeroshot", "linear-probe", "retrieval")
# The segmentation decoder's training (also the defaults when evaluate_model gets other args).
SEG_EPOCHS = 20
SEG_LR = 1e-3
# Per-label AUROC on fewer positives or negatives than this is marked as low support.
MIN_SUPPORT = 5
# The namespace attribute naming the flags given on the command line (by dest): a flag given
# its default value is still given, which `--protocol` must tell from one left unset.
EXPLICIT = "explicit_flags"


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `mgll-train eval`; the namespace's `explicit_flags` names those given."""
    _record_explicit_flags(parser)
    required = parser.add_argument_group("required arguments")
    required.add_argument(
        "--checkpoint", type=Path, required=True, help="a .pt checkpoint written by fit"
    )
    required.add_argument(
        "--data",
        help="dataset to evaluate on: a build folder, Parquet files or globs, or hf:org/name "
        "(required, but not with --suite; with --protocol: a build of that protocol's release)",
    )
    required.add_argument(
        "--out", type=Path, required=True, help="folder for metrics.json, table.txt and plots"
    )
    parser.add_argument("--split", default="test", help="the split of --data to evaluate")
    parser.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help=f"comma-separated tasks to run, of {','.join(TASKS)}; segmentation needs a build "
        f"with masks (default: {','.join(DEFAULT_TASKS)})",
    )
    parser.add_argument(
        "--train-data",
        default=None,
        help="training data of the linear probe and the segmentation decoder (default: the "
        "checkpoint's training data)",
    )
    parser.add_argument(
        "--train-split",
        default=None,
        help="the split of --train-data the probe and the decoder learn from (default: the "
        "checkpoint's, train)",
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
    _segmentation_arguments(parser)
    _protocol_arguments(parser)
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


def _segmentation_arguments(parser: argparse.ArgumentParser) -> None:
    """How the segmentation decoder is trained (`--tasks segmentation`)."""
    parser.add_argument(
        "--seg-epochs",
        type=non_negative_int,
        default=SEG_EPOCHS,
        help="epochs of the segmentation decoder on the frozen image tower; 0: the untrained "
        f"decoder, a chance baseline (default: {SEG_EPOCHS})",
    )
    parser.add_argument(
        "--seg-lr",
        type=float,
        default=SEG_LR,
        help=f"learning rate of the segmentation decoder, AdamW, cosine decay (default: {SEG_LR})",
    )
    parser.add_argument(
        "--seg-balance-negatives",
        action="store_true",
        help="train the segmentation decoder on as many images with an empty mask as with a "
        "region, drawn at random (seeded), as the SIIM-ACR protocol does (default: all images)",
    )


def _protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """Named benchmark protocols and suites (`protocols.py`, `suite.py`)."""
    parser.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        default=None,
        help="run a named, versioned benchmark protocol on --data, a build of its release: it "
        "fixes the split, tasks, labels and uncertain policy (setting one of those flags "
        "otherwise is an error); epochs and learning rates you set are used and recorded as "
        "overrides (default: none, the flags decide)",
    )
    parser.add_argument(
        "--suite",
        choices=sorted(SUITES),
        default=None,
        help="run every protocol of a suite whose release is built under --builds; write "
        "OUT/<protocol>/ per protocol and OUT/suite.md, suite.tex, suite.json (default: none)",
    )
    parser.add_argument(
        "--builds",
        type=Path,
        default=None,
        help="with --suite: a folder holding builds (one per release), each recognised by the "
        "pipeline its rows' source column names, whatever the folder is called (default: none)",
    )


def _record_explicit_flags(parser: argparse.ArgumentParser) -> None:
    """Make the flags added to `parser` from now on note their dest in `explicit_flags`.

    argparse calls a flag's action only when the flag is on the command line, never for its
    default, so a value given that equals the default is still noted.
    """
    parser.set_defaults(**{EXPLICIT: frozenset()})
    for name in (None, "store", "store_true"):  # None: add_argument without action=
        parser.register("action", name, _noting(parser._registry_get("action", name)))


def _noting(action: type[argparse.Action]) -> type[argparse.Action]:
    """`action`, noting its dest in the namespace's `explicit_flags` when called."""

    class Noting(action):  # type: ignore[valid-type, misc]
        def __call__(
            self,
            parser: argparse.ArgumentParser,
            namespace: argparse.Namespace,
            values: Any,
            option_string: str | None = None,
        ) -> None:
            super().__call__(parser, namespace, values, option_string)
            given = getattr(namespace, EXPLICIT, frozenset())
            setattr(namespace, EXPLICIT, given | {self.dest})

    return Noting


def flag_given(args: argparse.Namespace, dest: str, defaults: dict[str, object]) -> bool:
    """Whether the user gave `dest`'s flag, even at its default value. A namespace the eval
    parser did not make (no `explicit_flags`) counts a flag as given when it is not the default.
    """
    explicit = getattr(args, EXPLICIT, None)
    if explicit is not None:
        return dest in explicit
    return getattr(args, dest, defaults.get(dest)) != defaults.get(dest)


def eval_args_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with a combination of `eval` flags argparse cannot check (None: nothing);
    checked before torch loads."""
    suite = getattr(args, "suite", None)
    if suite is None:
        if getattr(args, "builds", None) is not None:
            return "--builds is read only with --suite"
        return None if args.data else "--data is required (or --suite with --builds)"
    if args.data or getattr(args, "protocol", None):
        return "--suite reads its builds from --builds; drop --data and --protocol"
    if getattr(args, "builds", None) is None:
        return f"--suite {suite} needs --builds, a folder holding builds"
    return None


def eval_defaults() -> dict[str, object]:
    """The default of every `eval` flag, by destination (to tell what a user set)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_eval_arguments(parser)
    return {a.dest: a.default for a in parser._actions if a.dest != "help"}
