"""`mgll-train fit`: the training loop (DDP as open_clip detects it, AMP, checkpoints, resume)."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from open_clip_train.distributed import init_distributed_device_so
from open_clip_train.precision import get_autocast
from open_clip_train.scheduler import cosine_lr
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import (
    load_checkpoint,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap,
)
from .config import resolved_config
from .data import MgllDataset, SampleTransform, TruncationStats
from .feed import make_feed
from .loss import MGLLLoss
from .model import DEFAULT_LOGIT_BIAS, clamp_logit_scale, create_model
from .reporting import MetricsReporter, check_report_to

log = logging.getLogger("mgll_train")


class FeatureModel(torch.nn.Module):
    """One forward for the image batch and all G text batches, so DDP sees a single call.

    Returns normalised features, or the projected unnormalised ones that `--loss mgll-official`
    needs (the reference code normalises nothing).
    """

    def __init__(self, clip: torch.nn.Module, normalize: bool = True):
        super().__init__()
        self.clip = clip
        self.normalize = normalize

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        g, b, length = texts.shape
        text_features = self.clip.encode_text(texts.reshape(g * b, length), self.normalize)
        out = {
            "image_features": self.clip.encode_image(images, self.normalize),
            "text_features": text_features.reshape(g, b, -1),
            "logit_scale": self.clip.logit_scale.exp(),
        }
        if getattr(self.clip, "logit_bias", None) is not None:
            out["logit_bias"] = self.clip.logit_bias
        return out


@dataclass
class Run:
    """The run directory, open_clip's layout."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"


def default_name(args: argparse.Namespace) -> str:
    stamp = time.strftime("%Y_%m_%d-%H_%M_%S")
    return (
        f"{stamp}-model_{args.model}-loss_{args.loss}-lr_{args.lr}-b_{args.batch_size}"
        f"-j_{args.workers}-p_{args.precision}"
    )


def _setup_logging(run: Run, is_master: bool) -> None:
    """Our progress on stdout and in out.log (master only); other libraries' warnings only."""
    formatter = logging.Formatter("%(asctime)s | %(levelname)s | %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if is_master:
        handlers.append(logging.FileHandler(run.root / "out.log"))
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=logging.WARNING, force=True, handlers=handlers)
    log.setLevel(logging.INFO if is_master else logging.WARNING)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on gains, biases, embeddings' scalars, logit scale and bias (open_clip)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exclude = param.ndim < 2 or any(k in name for k in ("bn", "ln", "bias", "logit_scale"))
        (no_decay if exclude else decay).append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


class _StopFlag:
    """Set by SIGTERM: the loop saves a step checkpoint at the end of the step and exits."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True


def fit(args: argparse.Namespace) -> Path:
    """Train as `args` says; return the run directory."""
    check_report_to(args.report_to)  # every rank, before any work
    dist = init_distributed_device_so(device=args.device)
    device = torch.device(dist["device"])
    rank, world_size = dist["global_rank"], dist["world_size"]
    is_master = rank == 0
    name = args.name or default_name(args)
    run = Run(Path(args.logs) / name)
    if is_master:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
    if world_size > 1:
        torch.distributed.barrier()
    _setup_logging(run, is_master)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    bundle = create_model(
        args.model,
        args.pretrained,
        device=device,
        init_logit_bias=DEFAULT_LOGIT_BIAS if args.loss == "mgll" else None,
        lock_image=args.lock_image,
        lock_text=args.lock_text,
        grad_checkpointing=args.grad_checkpointing,
    )
    transform = SampleTransform.from_model(
        bundle.model,
        bundle.tokenizer,
        granularities=tuple(args.granularities),
        uncertain=args.uncertain,
        unmentioned=args.unmentioned,
        text_sampling=args.text_sampling,
        augment=args.augment,
    )
    feed = make_feed(args, transform, rank, world_size)
    model: torch.nn.Module = FeatureModel(bundle.model, normalize=args.loss != "mgll-official")
    if world_size > 1:
        model = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(
        _param_groups(model, args.wd), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps
    )
    scaler = torch.amp.GradScaler(device.type) if args.precision == "amp" else None
    steps_per_epoch = feed.steps_per_epoch
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    scheduler = cosine_lr(optimizer, args.lr, args.warmup, total_steps)
    loss_fn = MGLLLoss(
        mode=args.loss,
        soft_target=args.soft_target,
        weights=args.loss_weights,
        pointwise_target=args.pointwise_target,
        rank=rank,
        world_size=world_size,
        gather_with_grad=args.gather_with_grad,
        local_loss=args.local_loss,
    )

    start_epoch, start_batch, start_unit, step = 0, 0, 0, 0
    if args.resume:
        path = resolve_resume(args.resume, run.checkpoints)
        state = load_checkpoint(path)
        unwrap(model).clip.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
        start_unit = state.get("unit", 0)
        set_rng_state(state["rng"])
        log.info(
            "resumed from %s at epoch %d, batch %d (step %d)", path, start_epoch, start_batch, step
        )
    config = resolved_config(args) | {"name": name}
    if is_master:
        (run.root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=True))
        (run.root / "params.txt").write_text("".join(f"{k}: {v}\n" for k, v in config.items()))
        log.info(
            "training %s on %d rows (%d steps/epoch, %d process(es)%s), loss %s",
            args.model,
            feed.rows,
            steps_per_epoch,
            world_size,
            ", streaming" if feed.streaming else "",
            args.loss,
        )

    def state_at(epoch: int, batch: int, unit: int = 0) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "batch": batch,
            "unit": unit,  # streaming: the first row group not yet read (row-group resume)
            "step": step,
            "name": name,
            "model_name": args.model,
            "state_dict": unwrap(model).clip.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "config": config,
            "label_names": feed.label_names,
            "train_data": args.train_data,
            "rng": rng_state(),
        }

    reporter = (
        MetricsReporter(run.root, args.report_to, purge_step=step + 1 if args.resume else None)
        if is_master
        else None
    )
    try:
        stop = _StopFlag()
        stop.install()
        autocast = get_autocast(args.precision, device_type=device.type)
        truncation = TruncationStats(args.granularities)
        for epoch in range(start_epoch, args.epochs):
            resuming = epoch == start_epoch
            batch_index = first_batch = start_batch if resuming else 0
            next_unit = start_unit if resuming else 0
            loader = feed.batches(
                epoch, first_batch, next_unit, args.workers, pin_memory=device.type == "cuda"
            )
            started = time.time()
            for batch in loader:
                if step >= total_steps:
                    break
                scheduler(step)
                losses = _train_step(
                    model,
                    loss_fn,
                    optimizer,
                    scaler,
                    autocast,
                    batch,
                    device,
                    accum_freq=args.accum_freq,
                    grad_clip_norm=args.grad_clip_norm,
                )
                step += 1
                batch_index += 1
                if "units" in batch:
                    next_unit = max(next_unit, int(batch["units"].max()) + 1)
                truncation.update(batch)
                if is_master and (step % args.log_every_n_steps == 0 or step == 1):
                    _log_step(
                        reporter,
                        model,
                        optimizer,
                        losses,
                        truncation,
                        epoch,
                        step,
                        batch_index,
                        args.batch_size
                        * world_size
                        * (batch_index - first_batch)
                        / max(time.time() - started, 1e-9),
                    )
                at_step_save = args.save_every_n_steps and step % args.save_every_n_steps == 0
                if is_master and (at_step_save or stop.requested):
                    save_checkpoint(
                        run.checkpoints / f"step_{step}.pt",
                        state_at(epoch, batch_index, next_unit),
                        latest=run.checkpoints / "epoch_latest.pt",
                    )
                if stop.requested:
                    log.info("SIGTERM: saved step %d; resume with --resume latest", step)
                    return run.root
            finished = batch_index >= steps_per_epoch
            if (
                is_master
                and finished
                and ((epoch + 1) % args.save_frequency == 0 or epoch + 1 == args.epochs)
            ):
                save_checkpoint(
                    run.checkpoints / f"epoch_{epoch + 1}.pt",
                    state_at(epoch + 1, 0),
                    latest=run.checkpoints / "epoch_latest.pt",
                )
            if is_master and args.val_data and finished:  # evaluation during training (issue 5)
                _evaluate_epoch(
                    reporter, unwrap(model).clip, bundle.tokenizer, args, epoch + 1, step, device
                )
            if step >= total_steps:
                if is_master and not finished:  # --max-steps ended the run inside an epoch
                    save_checkpoint(
                        run.checkpoints / f"step_{step}.pt",
                        state_at(epoch, batch_index, next_unit),
                        latest=run.checkpoints / "epoch_latest.pt",
                    )
                break
        if is_master:
            log.info("done: %d steps; checkpoints in %s", step, run.checkpoints)
    finally:
        if reporter is not None:
            reporter.close()
    if world_size > 1:
        torch.distributed.barrier()
    return run.root


def _evaluate_epoch(
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
            clip, tokenizer, args.val_data, args.val_split, tasks, eval_args, device
        )
    metrics = clean_metrics(metrics)
    zs = metrics.get("zeroshot", {}).get("macro_auroc")
    r5 = metrics.get("retrieval", {}).get("image_to_text", {}).get("R@5")
    log.info("eval epoch %d on %s: zero-shot macro AUROC %s, R@5 %s", epoch, args.val_split, zs, r5)
    reporter.evaluation(metrics, epoch, step)


def _train_step(
    model: torch.nn.Module,
    loss_fn: MGLLLoss,
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
    images = batch["images"].to(device, non_blocking=True)
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
            scale = _share_gradient(fresh["logit_scale"], accum_freq)
            bias = fresh.get("logit_bias")
            bias = _share_gradient(bias, accum_freq) if bias is not None else None
            losses = loss_fn(
                torch.cat([p["image_features"] for p in parts]),
                torch.cat([p["text_features"] for p in parts], dim=1),
                scale,
                logit_bias=bias,
                labels=labels,
                text_ids=text_ids,
            )
        if scaler is not None:
            scaler.scale(losses["loss"]).backward()
        else:
            losses["loss"].backward()
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
    return {k: v.detach() for k, v in losses.items()}


def _share_gradient(value: torch.Tensor, parts: int) -> torch.Tensor:
    """`value` unchanged, but only 1/parts of the gradient flows back through it."""
    if parts == 1:
        return value
    return value / parts + value.detach() * (1 - 1 / parts)


def _log_step(
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
        epoch,
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


__all__ = ["FeatureModel", "MgllDataset", "fit"]
