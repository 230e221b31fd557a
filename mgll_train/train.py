"""`mgll-train fit`: set up a run (DDP as open_clip detects it, AMP, resume) and train it.

:func:`fit` is the entry point: :func:`start_session` (device, rank, run directory, logging,
seeds), :func:`build_training` (model, data, optimizer, loss), :func:`resume` (a checkpoint's
state and position), :func:`record_config`, then :class:`mgll_train.loop.Trainer` runs the
epochs.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from open_clip_train.distributed import init_distributed_device_so
from open_clip_train.scheduler import cosine_lr
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import Run, load_checkpoint, load_weights, resolve_resume, set_rng_state, unwrap
from .config import resolved_config
from .data import MgllDataset, SampleTransform
from .devices import usable_device
from .errors import UserError
from .feed import make_feed
from .loop import Position, Session, Trainer, TrainingParts, train_step
from .losses import TokenObjective, create_loss, loss_class
from .model import DEFAULT_LOGIT_BIAS, FeatureModel, create_model
from .reporting import MetricsReporter, check_report_to

log = logging.getLogger("mgll_train")

# The step's former name, still imported by benchmarks/train_throughput.py and the tests.
_train_step = train_step


def fit(args: argparse.Namespace) -> Path:
    """Train as `args` says; return the run directory. SIGTERM saves a step checkpoint and
    exits with status 143 (128 + SIGTERM), so a scheduler sees the run did not finish."""
    started = time.time()
    session = start_session(args)
    parts = build_training(args, session)
    position = resume(args, session, parts) if args.resume else Position()
    config = record_config(args, session, parts)
    reporter = (
        MetricsReporter(
            session.run.root, args.report_to, purge_step=position.step + 1 if args.resume else None
        )
        if session.is_master
        else None
    )
    trainer = Trainer(args, session, parts, config, reporter, position)
    try:
        stopped = trainer.run()
    finally:
        if reporter is not None:
            reporter.close()
    if session.is_master and not stopped:
        log.info(trainer.summary(position, time.time() - started) + parts.feed.bad_samples.note())
    if stopped:  # SIGTERM: leave at once, without waiting for the other ranks
        sys.exit(128 + signal.SIGTERM)
    if session.world_size > 1:
        torch.distributed.barrier()
    return session.run.root


def default_name(args: argparse.Namespace) -> str:
    """open_clip's run name: the date and the main settings."""
    stamp = time.strftime("%Y_%m_%d-%H_%M_%S")
    return (
        f"{stamp}-model_{args.model}-loss_{args.loss}-lr_{args.lr}-b_{args.batch_size}"
        f"-j_{args.workers}-p_{args.precision}"
    )


def start_session(args: argparse.Namespace) -> Session:
    """Join the process group, create the run directory, set up logging and seed."""
    check_report_to(args.report_to)  # every rank, before any work
    device, fallback = usable_device(args.device)
    dist = init_distributed_device_so(device=device)
    rank, world_size = dist["global_rank"], dist["world_size"]
    name = args.name or default_name(args)
    session = Session(
        torch.device(dist["device"]), rank, world_size, name, Run(Path(args.logs) / name)
    )
    if not args.resume:
        refuse_existing_run(session.run)
    if world_size > 1:  # every rank has looked before the master creates the folder
        torch.distributed.barrier()
    if session.is_master:
        session.run.checkpoints.mkdir(parents=True, exist_ok=True)
    if world_size > 1:
        torch.distributed.barrier()
    _setup_logging(session.run, session.is_master)
    if fallback:
        log.warning(fallback)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    return session


def refuse_existing_run(run: Run) -> None:
    """A fresh `fit` never writes into a run folder that already holds a run (as open_clip):
    its checkpoints would be replaced and its logs appended to."""
    if any((run.root / part).exists() for part in _RUN_FILES):
        raise UserError(
            f"{run.root} already holds a run; pass --resume latest to continue it, "
            "or choose another --name"
        )


# What `fit` writes into a run folder; any of them means the folder holds a run.
_RUN_FILES = ("checkpoints", "out.log", "config.yaml", "params.txt", "metrics.jsonl")


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


def build_training(args: argparse.Namespace, session: Session) -> TrainingParts:
    """The model (as the loss needs it), the data feed, optimizer, schedule and loss."""
    objective = loss_class(args.loss)
    bundle = create_model(
        args.model,
        args.pretrained,
        device=session.device,
        weights_follow=bool(args.resume),
        init_logit_bias=DEFAULT_LOGIT_BIAS if objective.uses_logit_bias else None,
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
        # MGLL's targets are the labels; CLIP, MGCA and G2D pair images with texts only
        labels_required=args.loss not in ("clip", "mgca", "g2d"),
    )
    feed = make_feed(args, transform, session.rank, session.world_size)
    loss_fn = create_loss(args, session.rank, session.world_size)
    plan = None
    if isinstance(loss_fn, TokenObjective):  # token losses: captured tokens, trainable heads
        plan = loss_fn.token_plan(bundle.model, bundle.tokenizer, tuple(args.granularities))
        plan.heads.to(session.device)
    model: torch.nn.Module = FeatureModel(bundle.model, objective.normalized_features, plan)
    if session.world_size > 1:
        device = session.device
        model = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(
        _param_groups(model, args.wd), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps
    )
    total_steps = feed.steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    return TrainingParts(
        model=model,
        tokenizer=bundle.tokenizer,
        feed=feed,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(session.device.type) if args.precision == "amp" else None,
        scheduler=cosine_lr(optimizer, args.lr, args.warmup, total_steps),
        loss_fn=loss_fn,
        total_steps=total_steps,
    )


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


def resume(args: argparse.Namespace, session: Session, parts: TrainingParts) -> Position:
    """Load `--resume` into the model, optimizer, scaler and RNGs; return where it stopped."""
    path = resolve_resume(args.resume, session.run.checkpoints)
    state = load_checkpoint(path)
    if state["model_name"] != args.model or "optimizer" not in state:
        raise UserError(
            f"{path}: a checkpoint of model {state['model_name']!r}"
            + ("" if "optimizer" in state else " without optimizer state")
            + f"; this run trains {args.model!r} (--resume needs a checkpoint of the same run)"
        )
    load_weights(unwrap(parts.model).clip, state, path)  # one line naming what does not fit
    unwrap(parts.model).load_heads(state, path)
    try:
        parts.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError) as err:  # other layers, or other frozen parameter groups
        message = str(err).splitlines()[0]
        raise UserError(f"{path}: does not fit this run's model and flags ({message})") from err
    if parts.scaler is not None and state.get("scaler"):
        parts.scaler.load_state_dict(state["scaler"])
    position = Position(
        epoch=state["epoch"], batch=state["batch"], unit=state.get("unit", 0), step=state["step"]
    )
    set_rng_state(state["rng"])
    log.info(
        "resumed from %s at epoch %d, batch %d (step %d)",
        path,
        position.epoch,
        position.batch,
        position.step,
    )
    return position


def record_config(
    args: argparse.Namespace, session: Session, parts: TrainingParts
) -> dict[str, Any]:
    """The resolved config; the master writes config.yaml and params.txt and logs the plan."""
    config = resolved_config(args) | {"name": session.name}
    if session.is_master:
        root, feed = session.run.root, parts.feed
        (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=True))
        (root / "params.txt").write_text("".join(f"{k}: {v}\n" for k, v in config.items()))
        log.info(
            "training %s on %d rows (%d steps/epoch, %d process(es)%s), loss %s",
            args.model,
            feed.rows,
            feed.steps_per_epoch,
            session.world_size,
            ", streaming" if feed.streaming else "",
            args.loss,
        )
    return config


__all__ = ["FeatureModel", "MgllDataset", "fit"]
