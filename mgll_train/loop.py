"""The training loop of one process: epochs, optimizer steps, logging, checkpoints, evaluation.

:func:`mgll_train.train.fit` sets up a :class:`Session` and the :class:`TrainingParts`, then runs
a :class:`Trainer` from a :class:`Position` (the start, or where a checkpoint left off).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from open_clip_train.precision import get_autocast

from .checkpoint import Run, rng_state, save_checkpoint, unwrap
from .data import TruncationStats
from .data.normalize import model_input
from .feed import Feed
from .losses import MultiGranularLoss, TokenObjective
from .model import clamp_logit_scale
from .reporting import MetricsReporter, TrainingProgress

log = logging.getLogger("mgll_train")

__all__ = ["Position", "Session", "Trainer", "TrainingParts", "share_gradient", "train_step"]


@dataclass
class Session:
    """Where this process trains: its device and rank, and the run directory."""

    device: torch.device
    rank: int
    world_size: int
    name: str
    run: Run

    @property
    def is_master(self) -> bool:
        return self.rank == 0


@dataclass
class TrainingParts:
    """What the loop trains with."""

    model: torch.nn.Module  # a FeatureModel, wrapped in DDP when distributed
    tokenizer: Any
    feed: Feed
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    scheduler: Callable[[int], Any]  # sets the learning rate of a step
    loss_fn: MultiGranularLoss
    total_steps: int


@dataclass
class Position:
    """Where training (re)starts: the epoch, the batch within it, the first streaming row group
    not yet read, and the optimizer steps done."""

    epoch: int = 0
    batch: int = 0
    unit: int = 0
    step: int = 0


@dataclass
class _EpochProgress:
    batch: int  # batches of the epoch done
    unit: int  # streaming: the first row group not yet read
    stopped: bool  # SIGTERM ended the epoch (a step checkpoint was saved)


class _StopFlag:
    """Set by SIGTERM: the loop saves a step checkpoint at the end of the step and exits."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True


class Trainer:
    """Runs the epochs of one process from a :class:`Position`.

    The master alone logs, saves checkpoints and evaluates; every rank steps.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        session: Session,
        parts: TrainingParts,
        config: dict[str, Any],
        reporter: MetricsReporter | None,
        start: Position,
    ) -> None:
        self.args = args
        self.session = session
        self.parts = parts
        self.config = config
        self.reporter = reporter
        self.start = start
        self.step = start.step
        self.epoch = start.epoch  # epochs completed
        self.last_loss: torch.Tensor | None = None  # of this run's last step
        self.progress: TrainingProgress | None = None  # the master's bar, while it runs

    def run(self) -> bool:
        """Train to the last epoch or `--max-steps`; return True when SIGTERM stopped the run.

        The master shows a progress bar (on a terminal, unless `--no-progress`) and a line per
        epoch.
        """
        stop = _StopFlag()
        stop.install()
        self.autocast = get_autocast(self.args.precision, device_type=self.session.device.type)
        self.truncation = TruncationStats(self.args.granularities)
        if self.session.is_master:
            self.progress = TrainingProgress(
                self.parts.total_steps,
                self.start.step,
                self.args.batch_size * self.session.world_size,
                show=not self.args.no_progress,
            )
        redirect = self.progress.redirect_logging() if self.progress else contextlib.nullcontext()
        try:
            with redirect:
                return self._run_epochs(stop)
        finally:
            if self.progress is not None:
                self.progress.close()

    def _run_epochs(self, stop: _StopFlag) -> bool:
        for epoch in range(self.start.epoch, self.args.epochs):
            if self.progress is not None:
                self.progress.start_epoch()
            ran = self._run_epoch(epoch, stop)
            if ran.stopped:
                return True
            finished = ran.batch >= self.parts.feed.steps_per_epoch
            if finished:
                self.epoch = epoch + 1
            if self.progress is not None:
                log.info(self.progress.epoch_line(epoch, self.args.epochs, finished))
            self._end_epoch(epoch, finished)
            if self.step >= self.parts.total_steps:
                # --max-steps ended it: save that point, unless the epoch checkpoint holds it
                if self.session.is_master and not (finished and self._saves_epoch(epoch)):
                    where = (epoch + 1, 0, 0) if finished else (epoch, ran.batch, ran.unit)
                    self._save(f"step_{self.step}.pt", *where)
                break
        return False

    def summary(self, start: Position, seconds: float) -> str:
        """The line that ends a run: steps, epochs, final loss, wall time, where the weights are."""
        checkpoints = self.session.run.checkpoints
        if self.step == start.step:
            return (
                f"nothing to train: step {self.step} of {self.parts.total_steps} already done "
                f"(epoch {self.epoch} of {self.args.epochs}); checkpoints in {checkpoints}"
            )
        loss = f"{float(self.last_loss):.4f}" if self.last_loss is not None else "n/a"
        root = self.session.run.root
        tensorboard = root / "tensorboard"
        return (
            f"done: {self.step - start.step} steps this run (step {self.step} of "
            f"{self.parts.total_steps}), {self.epoch} of {self.args.epochs} epochs complete, "
            f"final loss {loss}, {seconds:.1f} s; checkpoints in {checkpoints}, log "
            f"{root / 'out.log'}, metrics {root / 'metrics.jsonl'}"
            + (f", TensorBoard {tensorboard}" if tensorboard.is_dir() else "")
        )

    def _run_epoch(self, epoch: int, stop: _StopFlag) -> _EpochProgress:
        """The steps of one epoch (from the start position's batch when resuming into it)."""
        args, session = self.args, self.session
        resuming = epoch == self.start.epoch
        batch_index = first_batch = self.start.batch if resuming else 0
        next_unit = self.start.unit if resuming else 0
        loader = self.parts.feed.batches(
            epoch, first_batch, next_unit, args.workers, pin_memory=session.device.type == "cuda"
        )
        started = time.time()
        for batch in loader:
            if self.step >= self.parts.total_steps:
                break
            losses = self._step(batch)
            batch_index += 1
            if "units" in batch:
                next_unit = max(next_unit, int(batch["units"].max()) + 1)
            self.truncation.update(batch)
            if session.is_master and (self.step % args.log_every_n_steps == 0 or self.step == 1):
                seen = args.batch_size * session.world_size * (batch_index - first_batch)
                rate = seen / max(time.time() - started, 1e-9)
                self._log(losses, epoch, batch_index, rate)
            at_step_save = args.save_every_n_steps and self.step % args.save_every_n_steps == 0
            if session.is_master and (at_step_save or stop.requested):
                self._save(f"step_{self.step}.pt", epoch, batch_index, next_unit)
            if stop.requested:
                log.info("SIGTERM: saved step %d; resume with --resume latest", self.step)
                return _EpochProgress(batch_index, next_unit, stopped=True)
        return _EpochProgress(batch_index, next_unit, stopped=False)

    def _step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        parts = self.parts
        parts.scheduler(self.step)
        if isinstance(parts.loss_fn, TokenObjective):  # schedules of the token losses
            parts.loss_fn.set_position(self.epoch, self.step)
        losses = train_step(
            parts.model,
            parts.loss_fn,
            parts.optimizer,
            parts.scaler,
            self.autocast,
            batch,
            self.session.device,
            accum_freq=self.args.accum_freq,
            grad_clip_norm=self.args.grad_clip_norm,
        )
        self.step += 1
        self.last_loss = losses["loss"]  # a tensor: reading it every step would sync the GPU
        if self.progress is not None:
            self.progress.step(self.last_loss)
        return losses

    def _end_epoch(self, epoch: int, finished: bool) -> None:
        """An epoch checkpoint every `--save-frequency` epochs and the last; evaluation."""
        args = self.args
        if not (self.session.is_master and finished):
            return
        if self._saves_epoch(epoch):
            self._save(f"epoch_{epoch + 1}.pt", epoch + 1, 0)
        if args.val_data:
            evaluate_epoch(
                self.reporter,
                unwrap(self.parts.model).clip,
                self.parts.tokenizer,
                args,
                epoch + 1,
                self.step,
                self.session.device,
            )

    def _saves_epoch(self, epoch: int) -> bool:
        """Whether finishing `epoch` writes an epoch checkpoint (`--save-frequency`, the last)."""
        return (epoch + 1) % self.args.save_frequency == 0 or epoch + 1 == self.args.epochs

    def _save(self, filename: str, epoch: int, batch: int, unit: int = 0) -> None:
        """Save the state at (epoch, batch, unit) as `checkpoints/filename` and as the latest."""
        run = self.session.run
        save_checkpoint(
            run.checkpoints / filename, self._state(epoch, batch, unit), latest=run.latest
        )

    def _state(self, epoch: int, batch: int, unit: int) -> dict[str, Any]:
        parts, scaler = self.parts, self.parts.scaler
        return {
            "epoch": epoch,
            "batch": batch,
            "unit": unit,  # streaming: the first row group not yet read (row-group resume)
            "step": self.step,
            "name": self.session.name,
            "model_name": self.args.model,
            "state_dict": unwrap(parts.model).clip.state_dict(),
            **unwrap(parts.model).heads_state(),
            "optimizer": parts.optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "config": self.config,
            "label_names": parts.feed.label_names,
            "train_data": self.args.train_data,
            "rng": rng_state(),
        }

    def _log(
        self, losses: dict[str, torch.Tensor], epoch: int, batch: int, samples_per_s: float
    ) -> None:
        log_step(
            self.reporter,
            self.parts.model,
            self.parts.optimizer,
            losses,
            self.truncation,
            epoch,
            self.step,
            batch,
            samples_per_s,
        )


# ----------------------------------------------------------------------------- one step


def train_step(
    model: torch.nn.Module,
    loss_fn: MultiGranularLoss,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    autocast: Any,
    batch: dict[str, Any],
    device: torch.device,
    accum_freq: int = 1,
    grad_clip_norm: float | None = None,
) -> dict[str, torch.Tensor]:
    """One optimizer step on `batch`, split into `accum_freq` micro-batches if asked.

    With accumulation the loss is still the loss of the whole batch, as in open_clip: the
    features of every micro-batch are first computed without gradients and cached; then each
    micro-batch is recomputed with gradients and the loss taken over its fresh features and the
    others' cached ones, so the accumulated gradient is the whole batch's.
    """
    images = model_input(batch["images"], unwrap(model).clip, device)  # uint8 → normalised
    texts = batch["texts"].to(device, non_blocking=True)
    labels = batch["labels"].to(device)
    text_ids = batch["text_ids"].to(device)
    image_chunks = images.chunk(accum_freq)
    text_chunks = texts.chunk(accum_freq, dim=1)
    cached: list[dict[str, torch.Tensor]] = []
    if accum_freq > 1:
        with torch.no_grad(), autocast():
            cached = [model(i, t) for i, t in zip(image_chunks, text_chunks, strict=True)]
    optimizer.zero_grad(set_to_none=True)
    for j in range(accum_freq):
        with autocast():
            fresh = model(image_chunks[j], text_chunks[j])
            parts = [fresh if k == j else cached[k] for k in range(accum_freq)]
            # The scale and bias enter every micro-batch's loss: each carries 1/accum_freq of
            # their gradient (same values), or it would be counted accum_freq times. Detaching
            # all but one instead would leave DDP with parameters unused in a backward.
            scale = share_gradient(fresh["logit_scale"], accum_freq)
            bias = fresh.get("logit_bias")
            bias = share_gradient(bias, accum_freq) if bias is not None else None
            extra = {}
            if "dense" in fresh:  # token losses: their heads' outputs, batch first
                extra["dense"] = {
                    k: torch.cat([p["dense"][k] for p in parts]) for k in fresh["dense"]
                }
            losses = loss_fn(
                torch.cat([p["image_features"] for p in parts]),
                torch.cat([p["text_features"] for p in parts], dim=1),
                scale,
                logit_bias=bias,
                labels=labels,
                text_ids=text_ids,
                **extra,
            )
        if scaler is not None:
            scaler.scale(losses["loss"]).backward()
        else:
            losses["loss"].backward()
    _optimizer_step(model, optimizer, scaler, grad_clip_norm)
    return {k: v.detach() for k, v in losses.items()}


def _optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    grad_clip_norm: float | None,
) -> None:
    """Clip (on unscaled gradients), step, and keep the logit scale within [1, 100]."""
    if scaler is not None:
        if grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        if grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        optimizer.step()
    clamp_logit_scale(unwrap(model).clip)


def share_gradient(value: torch.Tensor, parts: int) -> torch.Tensor:
    """`value` unchanged, but only 1/parts of the gradient flows back through it."""
    if parts == 1:
        return value
    return value / parts + value.detach() * (1 - 1 / parts)


# ----------------------------------------------------------------------------- reporting


def log_step(
    reporter: MetricsReporter,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    losses: dict[str, torch.Tensor],
    truncation: TruncationStats,
    epoch: int,
    step: int,
    batch: int,
    samples_per_s: float,
) -> None:
    """One line of out.log and one record of metrics.jsonl (+ TensorBoard) for a step."""
    clip = unwrap(model).clip
    record = {
        "step": step,
        "epoch": epoch,
        "batch": batch,
        **{k: float(v) for k, v in losses.items()},
        "lr": optimizer.param_groups[0]["lr"],
        "logit_scale": float(clip.logit_scale.detach().exp()),
        "samples_per_s": round(samples_per_s, 2),
        "truncated": {g: round(r, 4) for g, r in truncation.rates().items()},
    }
    if getattr(clip, "logit_bias", None) is not None:
        record["logit_bias"] = float(clip.logit_bias.detach())
    if not all(math.isfinite(record[k]) for k in ("loss", "logit_scale")):
        log.warning("non-finite loss at step %d: %s", step, record)
    log.info(
        "epoch %d step %d loss %.4f (soft %.4f, point-wise %.4f, kl %.4f) lr %.2e "
        "scale %.2f %.1f samples/s",
        epoch + 1,  # counted from 1, as the epoch lines and epoch_N.pt (metrics.jsonl: from 0)
        step,
        record["loss"],
        record["soft_contrastive"],
        record["pointwise"],
        record["kl"],
        record["lr"],
        record["logit_scale"],
        samples_per_s,
    )
    reporter.train(record, step)


def evaluate_epoch(
    reporter: MetricsReporter,
    clip: torch.nn.Module,
    tokenizer: Any,
    args: argparse.Namespace,
    epoch: int,
    step: int,
    device: torch.device,
) -> None:
    """`--val-data`: one line `{"eval": {...}, "epoch": N}` of metrics.jsonl (+ TensorBoard)."""
    from .evaluate import clean_metrics, evaluate_model

    tasks = []
    if args.zeroshot_frequency and epoch % args.zeroshot_frequency == 0:
        tasks.append("zeroshot")
    if args.val_frequency and epoch % args.val_frequency == 0:
        tasks.append("retrieval")
    if not tasks:
        return
    eval_args = argparse.Namespace(
        uncertain="ignore", unmentioned="ignore", seed=args.seed, batch_size=args.batch_size,
        workers=0, bootstrap=200, finetune=False,
    )  # fmt: skip
    with torch.no_grad():
        metrics, _ = evaluate_model(
            clip,
            tokenizer,
            args.val_data,
            args.val_split,
            tasks,
            eval_args,
            device,
            progress=False if args.no_progress else None,
        )
    metrics = clean_metrics(metrics)
    zs = metrics.get("zeroshot", {}).get("macro_auroc")
    r5 = metrics.get("retrieval", {}).get("image_to_text", {}).get("R@5")
    log.info("eval epoch %d on %s: zero-shot macro AUROC %s, R@5 %s", epoch, args.val_split, zs, r5)
    reporter.evaluation(metrics, epoch, step)
