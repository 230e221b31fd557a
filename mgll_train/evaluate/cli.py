"""`mgll-train eval`: its flags, loading a checkpoint, and writing metrics.json, table and plots."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_checkpoint
from ..config import non_negative_int, positive_int
from ..data.labels import UNCERTAIN_POLICIES, UNMENTIONED_POLICIES
from ..errors import UserError
from .report import clean_metrics, format_table, write_plots
from .runner import TASKS, evaluate_model

log = logging.getLogger("mgll_train")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `mgll-train eval`."""
    parser.add_argument("--checkpoint", type=Path, required=True, help="a .pt checkpoint")
    parser.add_argument("--data", required=True, help="dataset to evaluate on (as --train-data)")
    parser.add_argument("--split", default="test", help="value of the split column (test)")
    parser.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help="comma-separated: zeroshot,linear-probe,retrieval (all)",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics.json and plots")
    parser.add_argument(
        "--train-data",
        default=None,
        help="linear-probe training data (default: the checkpoint's training data)",
    )
    parser.add_argument("--train-split", default=None, help="its split (the checkpoint's: train)")
    parser.add_argument(
        "--batch-size", type=positive_int, default=64, help="images per forward pass (64)"
    )
    parser.add_argument(
        "--workers", type=non_negative_int, default=2, help="data loader workers (2)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--uncertain",
        choices=UNCERTAIN_POLICIES,
        default="ignore",
        help="what -1 labels become (ignore: left out)",
    )
    parser.add_argument(
        "--unmentioned",
        choices=UNMENTIONED_POLICIES,
        default="ignore",
        help="what NaN labels become (ignore: left out)",
    )
    parser.add_argument("--probe-epochs", type=int, default=50, help="probe epochs (50)")
    parser.add_argument("--probe-lr", type=float, default=1e-3, help="linear head lr (1e-3)")
    parser.add_argument("--finetune", action="store_true", help="fine-tune the image tower too")
    parser.add_argument(
        "--finetune-lr", type=float, default=1.25e-4, help="fine-tuning lr (1.25e-4)"
    )


def load_model_from_checkpoint(path: Path, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """``(ModelBundle, checkpoint)`` with the checkpoint's weights loaded."""
    # Imported here: open_clip loads only when a checkpoint is evaluated, not for --help.
    from ..model import DEFAULT_LOGIT_BIAS, create_model

    state = load_checkpoint(Path(path))
    has_bias = any(k == "logit_bias" for k in state["state_dict"])
    bundle = create_model(
        state["model_name"],
        None,
        device=device,
        init_logit_bias=DEFAULT_LOGIT_BIAS if has_bias else None,
        weights_follow=True,
    )
    bundle.model.load_state_dict(state["state_dict"])
    bundle.model.eval()
    return bundle, state


def eval_device(name: str) -> torch.device:
    """``--device`` read as ``fit`` reads it: a known accelerator that is not available here
    falls back to the CPU (with a warning); a name torch does not know is a user error."""
    from open_clip_train.distributed import is_device_available

    try:
        available, known = is_device_available(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r} is not a torch device ({err})") from err
    if known and not available:
        log.warning("--device %s is not available here; evaluating on the CPU", name)
        return torch.device("cpu")
    return torch.device(name)


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """`mgll-train eval`: write metrics.json, plots; print the table; return the metrics."""
    torch.manual_seed(args.seed)
    device = eval_device(args.device)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bundle, state = load_model_from_checkpoint(args.checkpoint, device)
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
    )
    metrics = {
        "checkpoint": str(args.checkpoint),
        "model": state["model_name"],
        "step": state.get("step"),
        "seed": args.seed,
        **metrics,
    }
    metrics.pop("seconds", None)  # keep metrics.json identical across runs
    args.out.mkdir(parents=True, exist_ok=True)
    clean = clean_metrics(metrics)
    (args.out / "metrics.json").write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
    table = format_table(clean)
    (args.out / "table.txt").write_text(table + "\n")
    write_plots(clean, extras, args.out)
    print(table)
    return clean
