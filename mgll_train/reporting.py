"""Where training metrics go: `metrics.jsonl` always, TensorBoard as `--report-to` says; and
what the master shows while it trains (a progress bar, a line per epoch).

`--report-to auto` (the default) writes TensorBoard event files under `<run>/tensorboard` when
the `tensorboard` package is installed and stays quiet when it is not; `tensorboard` insists
(a clear error when it is missing); `none` writes the JSON lines only. Scalar names follow
open_clip's `train/…` and `val/…` tags so dashboards built for it read ours.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

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


class TrainingProgress:
    """What the master shows while training: a tqdm bar over the run's steps (loss and
    samples/s beside it) and a summary line per epoch.

    The bar is drawn only on a terminal (tqdm's `disable=None`) unless `show` is False. Losses
    are summed as they come (tensors stay on their device): reading one is a device sync, so
    the postfix reads the last loss at most once a second and the epoch mean once an epoch.
    """

    def __init__(
        self, total_steps: int, done_steps: int, samples_per_step: int, show: bool = True
    ) -> None:
        self.samples_per_step = samples_per_step
        self.bar = tqdm(
            total=total_steps,
            initial=done_steps,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=None if show else True,
        )
        self._postfix_at = 0.0
        self.start_epoch()

    @property
    def shown(self) -> bool:
        """True when the bar is drawn (log lines then go through `tqdm.write`)."""
        return not self.bar.disable

    def start_epoch(self) -> None:
        """Reset the epoch's totals."""
        self.epoch_started = time.time()
        self.epoch_steps = 0
        self.loss_sum: Any = 0.0

    def step(self, loss: Any) -> None:
        """Count one optimizer step of this epoch with its loss (a float or 0-dim tensor)."""
        self.epoch_steps += 1
        self.loss_sum = self.loss_sum + loss
        self.bar.update(1)
        now = time.time()
        if self.shown and now - self._postfix_at >= 1.0:
            self._postfix_at = now
            self.bar.set_postfix(loss=f"{float(loss):.4f}", samples_s=f"{self.rate():.1f}")

    def rate(self) -> float:
        """Samples per second over this epoch so far (all processes)."""
        seconds = max(time.time() - self.epoch_started, 1e-9)
        return self.epoch_steps * self.samples_per_step / seconds

    def epoch_line(self, epoch: int, epochs: int, finished: bool) -> str:
        """`epoch E of N done: S steps, mean loss L, R samples/s, T s` for the epoch just run."""
        seconds = time.time() - self.epoch_started
        mean = float(self.loss_sum) / self.epoch_steps if self.epoch_steps else float("nan")
        state = "done" if finished else "stopped"
        return (
            f"epoch {epoch + 1} of {epochs} {state}: {self.epoch_steps} steps, mean loss "
            f"{mean:.4f}, {self.rate():.1f} samples/s, {seconds:.1f} s"
        )

    def redirect_logging(self) -> contextlib.AbstractContextManager:
        """While the bar is drawn, console log lines are written above it, not through it."""
        return logging_redirect_tqdm() if self.shown else contextlib.nullcontext()

    def close(self) -> None:
        """Finish the bar."""
        self.bar.close()


__all__ = [
    "REPORT_CHOICES",
    "check_report_to",
    "MetricsReporter",
    "ReportError",
    "TrainingProgress",
    "numeric_leaves",
    "tensorboard_available",
]
