"""`mgll-train eval`: loading a checkpoint, and writing metrics.json, table and plots (the flags
are in `flags.py`)."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_checkpoint
from ..devices import usable_device
from ..errors import UserError
from .flags import eval_args_problem
from .report import clean_metrics, write_plots
from .runner import evaluate_model
from .table import format_table

log = logging.getLogger("mgll_train")


def load_model_from_checkpoint(path: Path, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """``(ModelBundle, checkpoint)`` with the checkpoint's weights loaded."""
    # Imported here: open_clip loads only when a checkpoint is evaluated, not for --help.
    from ..model import model_from_checkpoint

    state = load_checkpoint(Path(path))
    bundle = model_from_checkpoint(state, Path(path), device)
    bundle.model.eval()
    return bundle, state


def eval_device(name: str) -> torch.device:
    """``--device`` read as ``fit`` reads it: a known accelerator that is not available here
    falls back to the CPU (with a one-line warning); a name torch does not know is a user
    error."""
    device, warning = usable_device(name)
    if warning:
        log.warning(warning)
    return torch.device(device)


def write_outputs(
    metrics: dict[str, Any],
    extras: dict[str, Any],
    out: Path,
    lines: Callable[[dict[str, Any]], list[str]] | None = None,
    show: bool = True,
) -> dict[str, Any]:
    """Write metrics.json, table.txt (``lines`` of the metrics above the table) and the plots
    into ``out``; print the table when ``show``; return the JSON-safe metrics."""
    metrics.pop("seconds", None)  # keep metrics.json identical across runs
    out.mkdir(parents=True, exist_ok=True)
    clean = clean_metrics(metrics)
    (out / "metrics.json").write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
    table = "\n".join([*(lines(clean) if lines else []), format_table(clean)])
    (out / "table.txt").write_text(table + "\n")
    write_plots(clean, extras, out)
    if show:
        print(table)
    return clean


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """`mgll-train eval`: write metrics.json, plots; print the table; return the metrics.

    With ``--protocol`` or ``--suite`` the protocols decide what runs (`suite.py`)."""
    torch.manual_seed(args.seed)
    problem = eval_args_problem(args)
    if problem:
        raise UserError(problem)
    device = eval_device(args.device)
    bundle, state = load_model_from_checkpoint(args.checkpoint, device)
    if getattr(args, "suite", None) or getattr(args, "protocol", None):
        from .suite import run_protocol, run_suite  # lazily: suite.py imports this module

        run = run_suite if getattr(args, "suite", None) else run_protocol
        return run(args, bundle, state, device)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    config = state.get("config") or {}
    train_data = args.train_data or state.get("train_data")
    train_split = args.train_split or config.get("train-split", "train")
    metrics, extras = evaluate_model(
        bundle.model,
        bundle.tokenizer,
        args.data,
        args.split,
        tasks,
        args,
        device,
        train_data=train_data,
        train_split=train_split,
        progress=False if args.no_progress else None,
    )
    metrics = {
        "checkpoint": str(args.checkpoint),
        "model": state["model_name"],
        "step": state.get("step"),
        "seed": args.seed,
        **metrics,
    }
    return write_outputs(metrics, extras, args.out)
