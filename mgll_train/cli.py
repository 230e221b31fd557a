"""`mgll-train`: the trainer's command line (fit, eval, export).

Only the loss module exists so far; the training loop lands with its own issue, and until then
the command says so instead of pretending to train.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    parser = argparse.ArgumentParser(
        prog="mgll-train",
        description="Train open_clip models with the MGLL objective on mgll datasets "
        "(fit, eval, export). Not implemented yet: the MGLL loss is available as "
        "mgll_train.loss.MGLLLoss.",
    )
    parser.add_argument("command", nargs="?", choices=("fit", "eval", "export"))
    parser.parse_args(argv)
    print("mgll-train: error: the trainer is not implemented yet", file=sys.stderr)
    sys.exit(2)
