"""`mgll-train`: train (fit) open_clip models with the MGLL objective, evaluate and export them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import add_fit_arguments, parse_fit_args
from .errors import UserError
from .evaluate import add_eval_arguments


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mgll-train",
        description="Train open_clip models with the MGLL objective on mgll datasets. "
        "Distributed: launch with torchrun (or under SLURM), as open_clip.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fit = sub.add_parser(
        "fit",
        help="train a model",
        description="Train a model; flags follow "
        "open_clip's names. Writes logs/<name>/{out.log, params.txt, "
        "config.yaml, metrics.jsonl, checkpoints/}.",
    )
    add_fit_arguments(fit)
    export = sub.add_parser(
        "export",
        help="export a checkpoint for plain open_clip",
        description="Write open_clip_config.json, "
        "open_clip_model.safetensors and a model card into --out; load it "
        "with open_clip.create_model_and_transforms('local-dir:OUT').",
    )
    export.add_argument("--checkpoint", type=Path, required=True, help="a .pt checkpoint")
    export.add_argument("--out", type=Path, required=True, help="output folder")
    evaluate = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: zero-shot, linear probe, label-aware retrieval",
        description="Evaluate CKPT on a dataset split; write DIR/metrics.json, table.txt and "
        "PNG plots, and print the table.",
    )
    add_eval_arguments(evaluate)
    return parser


def _run(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Parse `argv` and run its command."""
    if argv[:1] == ["fit"]:
        fit_parser = next(a for a in parser._actions if a.dest == "command").choices["fit"]
        args = parse_fit_args(fit_parser, argv[1:])
        from .train import fit

        fit(args)
        return
    args = parser.parse_args(argv)
    if args.command == "export":
        from .export import export_checkpoint

        out = export_checkpoint(args.checkpoint, args.out)
        print(f"exported {args.checkpoint} to {out} (open_clip: 'local-dir:{out}')")
    elif args.command == "eval":
        from .evaluate import run_eval

        run_eval(args)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit status 2.

    A user error is a `UserError`, or a `FileNotFoundError` (a checkpoint, a vocabulary);
    anything else is a bug and keeps its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _run(_parser(), argv)
    except (UserError, FileNotFoundError) as err:
        print(f"mgll-train: error: {err}", file=sys.stderr)
        sys.exit(2)
