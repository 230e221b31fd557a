"""`mgll-train`: train (fit) open_clip models with the MGLL objective, evaluate and export them.

Parsing loads neither torch nor open_clip: `--help` and argument errors answer at once, and a
command imports what it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mgll_data.cli import closed_stdout_status

from .config import HelpFormatter, add_fit_arguments, parse_fit_args
from .errors import UserError
from .evaluate.flags import add_eval_arguments, eval_args_problem


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
        formatter_class=HelpFormatter,
    )
    add_fit_arguments(fit)
    export = sub.add_parser(
        "export",
        help="export a checkpoint for plain open_clip",
        description="Write open_clip_config.json, "
        "open_clip_model.safetensors and a model card into --out; load it "
        "with open_clip.create_model_and_transforms('local-dir:OUT').",
        formatter_class=HelpFormatter,
    )
    required = export.add_argument_group("required arguments")
    required.add_argument(
        "--checkpoint", type=Path, required=True, help="a .pt checkpoint written by fit"
    )
    required.add_argument(
        "--out", type=Path, required=True, help="folder for the open_clip config and weights"
    )
    evaluate = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: zero-shot, linear probe, label-aware retrieval",
        description="Evaluate a checkpoint on a dataset split; write OUT/metrics.json, "
        "table.txt and PNG plots, and print the table.",
        formatter_class=HelpFormatter,
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
        problem = eval_args_problem(args)
        if problem:  # before torch loads, as argparse's own errors
            commands = next(a for a in parser._actions if a.dest == "command")
            commands.choices["eval"].error(problem)
        from .evaluate import run_eval

        run_eval(args)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit status 2.

    A user error is a `UserError`, or a `FileNotFoundError` (a checkpoint, a vocabulary);
    anything else is a bug and keeps its traceback. A reader that stops early (`eval ... |
    head`) ends the command quietly with status 141, as `mgll-build-dataset`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _run(_parser(), argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
    except BrokenPipeError:
        sys.exit(closed_stdout_status())
    except (UserError, FileNotFoundError) as err:
        print(f"mgll-train: error: {err}", file=sys.stderr)
        sys.exit(2)
