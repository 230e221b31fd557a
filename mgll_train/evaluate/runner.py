"""`evaluate_model`: extract features once, then run the tasks asked for on them.

Deterministic for a seed: the loader reads the split in file order, the probe head's
initialisation, batches and subsets are seeded, and the model runs in eval mode.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from ..data import MgllDataset, SampleTransform, make_dataset
from ..errors import UserError
from .features import eval_transform, extract_features
from .flags import TASKS
from .probe import probe_block
from .retrieval import retrieval_block
from .segmentation import segmentation_block, with_masks
from .zeroshot import zeroshot_block


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    data: str,
    split: str,
    tasks: Sequence[str],
    args: Any,
    device: torch.device,
    train_data: str | None = None,
    train_split: str = "train",
    progress: bool | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``tasks`` on ``data``/``split``; return ``(metrics, extras for the plots)``.

    ``progress``: bars while features are extracted; None draws them only on a terminal.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"unknown eval tasks {unknown}; use {','.join(TASKS)}")
    started = time.time()
    transform = eval_transform(model, tokenizer, args)
    dataset = make_dataset(data, transform, split=split, seed=args.seed)
    metrics: dict[str, Any] = {"data": data, "split": split, "images": len(dataset)}
    extras: dict[str, Any] = {"names": dataset.label_names}
    if "segmentation" in tasks:  # checked first: a build without masks fails before any work
        seg_train = _train_set(train_data, train_split, transform, args, "segmentation")
        seg_sets = (with_masks(seg_train), with_masks(dataset))
    if set(tasks) - {"segmentation"}:  # the tasks on pooled features
        feats = extract_features(
            model,
            dataset,
            args.batch_size,
            args.workers,
            device,
            texts="retrieval" in tasks,
            progress=progress,
        )
        extras["labels"] = feats.labels
    if "zeroshot" in tasks:
        metrics["zeroshot"], extras["zeroshot_scores"] = zeroshot_block(
            model, tokenizer, dataset, feats, args, device
        )
    if "retrieval" in tasks:
        metrics["retrieval"] = retrieval_block(feats.image, feats.text, feats.labels)
    if "linear-probe" in tasks:
        train_set = _train_set(train_data, train_split, transform, args, "linear-probe")
        metrics["linear_probe"] = probe_block(
            model, train_set, dataset, feats, train_data, train_split, args, device, progress
        )
    if "segmentation" in tasks:
        shown: dict[str, Any] = {}
        metrics["segmentation"] = segmentation_block(
            model, *seg_sets, str(train_data), train_split, args, device, progress, examples=shown
        )
        extras["segmentation_examples"] = shown
    metrics["seconds"] = round(time.time() - started, 2)
    return metrics, extras


def _train_set(
    train_data: str | None, train_split: str, transform: SampleTransform, args: Any, task: str
) -> MgllDataset:
    """The training split a task learns from; a one-line error when no data is named."""
    if not train_data:
        raise UserError(f"{task} needs training data: the checkpoint names none; give --train-data")
    return make_dataset(train_data, transform, split=train_split, seed=args.seed)
