"""Where training metrics go: `metrics.jsonl` always, TensorBoard as `--report-to` says.

`--report-to auto` (the default) writes TensorBoard event files under `<run>/tensorboard` when
the `tensorboard` package is installed and stays quiet when it is not; `tensorboard` insists
(a clear error when it is missing); `none` writes the JSON lines only. Scalar names follow
open_clip's `train/…` and `val/…` tags so dashboards built for it read ours.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import UserError

REPORT_CHOICES = ("auto", "tensorboard", "none")


class ReportError(UserError):
    """`--report-to tensorboard` without the package: a one-line message for the CLI."""


def tensorboard_available() -> bool:
    """True when `torch.utils.tensorboard` can write event files (needs the tensorboard pkg)."""
    return importlib.util.find_spec("tensorboard") is not None


def numeric_leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """Flatten nested metric dicts to `a/b/c` → float, skipping lists, text and booleans."""
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            yield from numeric_leaves(value, name)
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int | float):
            yield name, float(value)  # NaN/inf included: a diverging run must show


def check_report_to(report_to: str) -> None:
    """Fail fast (on every rank, before any model is built) when `report_to` cannot be met."""
    if report_to not in REPORT_CHOICES:
        raise ReportError(f"--report-to {report_to!r}: expected one of {REPORT_CHOICES}")
    if report_to == "tensorboard" and not tensorboard_available():
        raise ReportError(
            "--report-to tensorboard: the tensorboard package is not installed "
            "(pip install tensorboard, or --report-to none)"
        )


class MetricsReporter:
    """Appends one JSON line per record and mirrors the numbers to TensorBoard when enabled.

    Only the master process makes one; `close()` flushes the event file.
    """

    def __init__(
        self, run_root: Path, report_to: str = "auto", purge_step: int | None = None
    ) -> None:
        check_report_to(report_to)
        self.jsonl = Path(run_root) / "metrics.jsonl"
        self.writer = None
        if report_to == "tensorboard" or (report_to == "auto" and tensorboard_available()):
            from torch.utils.tensorboard import SummaryWriter

            # On resume, events after the checkpoint's step are dropped rather than doubled.
            self.writer = SummaryWriter(
                log_dir=str(Path(run_root) / "tensorboard"), purge_step=purge_step
            )

    @property
    def tensorboard_dir(self) -> Path | None:
        """Where event files go, or None when TensorBoard is off."""
        return Path(self.writer.log_dir) if self.writer is not None else None

    def train(self, record: Mapping[str, Any], step: int) -> None:
        """One training log line: `{"train": record}`; scalars as `train/<name>`."""
        self._append({"train": record})
        self._scalars("train", record, step, skip=("step", "epoch", "batch"))

    def evaluation(self, metrics: Mapping[str, Any], epoch: int, step: int) -> None:
        """One evaluation line: `{"eval": metrics, "epoch": N}`; scalars as `val/<path>`."""
        self._append({"eval": metrics, "epoch": epoch})
        self._scalars("val", metrics, step)

    def close(self) -> None:
        """Flush and close the event file (metrics.jsonl is appended line by line)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _append(self, line: Mapping[str, Any]) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")

    def _scalars(
        self, group: str, tree: Mapping[str, Any], step: int, skip: tuple[str, ...] = ()
    ) -> None:
        if self.writer is None:
            return
        for name, value in numeric_leaves({k: v for k, v in tree.items() if k not in skip}):
            self.writer.add_scalar(f"{group}/{name}", value, step)
        self.writer.flush()  # a dashboard watching a live run sees each log step


__all__ = [
    "REPORT_CHOICES",
    "check_report_to",
    "MetricsReporter",
    "ReportError",
    "numeric_leaves",
    "tensorboard_available",
]
