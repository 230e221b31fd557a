"""`eval --tasks segmentation`: a decoder on the frozen image tower's patch tokens, trained on the
`mask` column of patient-level training subsets (1 %, 10 %, 100 %), scored on ``--split``.

The decoder and its training are in `decoder.py`. Training subsets are drawn as the linear
probe's (`probe.draw_patient_subset`, with "the mask has a region" as the one label, so every
subset holds an image with a region); ``--seg-balance-negatives`` then keeps, per subset, a
seeded sample of as many images with an empty mask as there are images with a region (the
SIIM-ACR protocol). Rows whose `mask` cell is null (no mask known) are left out of training and
scoring.

Scores are per image, then averaged: ``Dice = 2|P∩T| / (|P| + |T|)`` and
``IoU = |P∩T| / |P∪T|`` of the predicted (P) and true (T) masks; an image whose true and
predicted masks are both empty scores 1 on both (a correct "nothing there"), one of them empty
and the other not scores 0. 95 % intervals are percentile bootstraps of that mean over the
scored images (``--bootstrap`` resamples, ``--seed``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from mgll_data.record import MASK_COLUMN

from ..data import MgllDataset
from ..errors import UserError
from .decoder import TokenSet, extract_tokens, predict, train_decoder, vit_shape
from .features import patient_ids
from .flags import SEG_EPOCHS, SEG_LR
from .metrics import bootstrap_weights, percentile_ci
from .probe import PROBE_FRACTIONS, draw_patient_subset

DECODER = "setr-pup"
EXAMPLES = 4  # test images shown in segmentation_examples.png


def with_masks(dataset: MgllDataset) -> MgllDataset:
    """``dataset`` reading its `mask` column too (samples get ``mask``), never augmented; a
    file without the column is a one-line `UserError` naming it."""
    for path in dataset.records.files:
        if MASK_COLUMN not in pq.read_schema(path).names:
            raise UserError(
                f"{path}: no '{MASK_COLUMN}' column; segmentation needs a build with masks "
                "(e.g. the siim_acr or rsna_pneumonia pipelines)"
            )
    transform = dataclasses.replace(dataset.transform, masks=True, augment=False)
    records = dataset.records.with_columns(transform.columns)
    return MgllDataset(records, transform, seed=dataset.seed)


def region_scores(predicted: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image ``(Dice, IoU)`` of boolean masks ``[N, H, W]``; both empty: 1 and 1."""
    predicted = np.asarray(predicted, dtype=bool).reshape(len(predicted), -1)
    true = np.asarray(true, dtype=bool).reshape(len(true), -1)
    overlap = (predicted & true).sum(1).astype(np.float64)
    total = (predicted.sum(1) + true.sum(1)).astype(np.float64)
    union = total - overlap
    empty = total == 0
    dice = np.where(empty, 1.0, 2 * overlap / np.where(empty, 1.0, total))
    iou = np.where(empty, 1.0, overlap / np.where(empty, 1.0, union))
    return dice, iou


def mean_with_interval(
    values: np.ndarray, bootstrap: int, seed: int
) -> tuple[float | None, list[float | None]]:
    """The mean of per-image ``values`` and the 95 % percentile bootstrap interval of it."""
    n = len(values)
    if n == 0:
        return None, [None, None]
    if bootstrap <= 0:
        return float(values.mean()), [None, None]
    means = bootstrap_weights(n, bootstrap, seed) @ values / n
    return float(values.mean()), percentile_ci(means)


def balanced_rows(rows: np.ndarray, has_region: np.ndarray, seed: int) -> np.ndarray:
    """``rows`` with their empty-mask rows cut (seeded) to as many as rows with a region;
    unchanged when there are no more empty ones than those, or no region at all."""
    positive = rows[has_region[rows]]
    negative = rows[~has_region[rows]]
    if len(positive) == 0 or len(negative) <= len(positive):
        return rows
    rng = np.random.default_rng([seed, 104729])
    kept = rng.choice(negative, size=len(positive), replace=False)
    return np.sort(np.concatenate([positive, kept]))


def _setting(args: Any, name: str, default: Any) -> Any:
    """A segmentation flag, or its default where ``args`` are not `eval`'s (fit's evaluation)."""
    value = getattr(args, name, None)
    return default if value is None else value


def segmentation_block(
    model: torch.nn.Module,
    train_set: MgllDataset,
    eval_set: MgllDataset,
    train_data: str,
    train_split: str,
    args: Any,
    device: torch.device,
    progress: bool | None = None,
    fractions: Sequence[float] = PROBE_FRACTIONS,
    balance_negatives: bool | None = None,
    examples: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``segmentation`` block of metrics.json.

    ``{"decoder", "epochs", "lr", "loss", "balance_negatives", "train_data", "train_split",
    "1%": {...}, "10%": {...}, "100%": {...}}``; each fraction holds ``dice``, ``dice_ci``,
    ``iou``, ``iou_ci`` (``[lo, hi]``), ``train_images`` (``train_positives``,
    ``train_negatives``, ``train_patients``), ``test_images`` and ``test_positives``. The
    datasets may come with any eval transform: their `mask` column is read here (a file
    without it is a `UserError`). ``balance_negatives`` None: ``args.seg_balance_negatives``;
    settings missing from ``args`` (fit's evaluation) take the `eval` defaults. ``examples``,
    when given, receives a few test images with their true and predicted masks (the last
    fraction's decoder) for `report.segmentation_figure`.
    """
    width, patch = vit_shape(model)
    train_set, eval_set = with_masks(train_set), with_masks(eval_set)
    if balance_negatives is None:
        balance_negatives = bool(getattr(args, "seg_balance_negatives", False))
    epochs = int(_setting(args, "seg_epochs", SEG_EPOCHS))
    lr = float(_setting(args, "seg_lr", SEG_LR))
    batch_size, workers = args.batch_size, getattr(args, "workers", 0)
    train = extract_tokens(model, train_set, batch_size, workers, device, progress)
    test = extract_tokens(model, eval_set, batch_size, workers, device, progress)
    known = np.flatnonzero(train.known)
    if len(known) == 0:
        raise UserError(f"{train_data}: no row of split {train_split!r} has a mask to train on")
    test_rows = np.flatnonzero(test.known)
    every_patient = patient_ids(train_set)
    patients = [every_patient[r] for r in known]
    regions = train.has_region[known].astype(np.float32)[:, None]
    block: dict[str, Any] = {
        "decoder": DECODER,
        "epochs": epochs,
        "lr": lr,
        "loss": "(1 - Dice) + BCE",
        "balance_negatives": balance_negatives,
        "train_data": train_data,
        "train_split": train_split,
    }
    predicted = None
    for fraction in fractions:
        rows = known[draw_patient_subset(patients, regions, fraction, args.seed).rows]
        if balance_negatives:
            rows = balanced_rows(rows, train.has_region, args.seed)
        decoder = train_decoder(train, rows, width, patch, epochs, lr, args.seed, device)
        predicted = predict(decoder, test, test_rows, device)
        block[f"{fraction:.0%}"] = _scores(predicted, test, test_rows, rows, train, args) | {
            "train_patients": len({every_patient[r] for r in rows})
        }
    if examples is not None and predicted is not None:
        examples.update(_examples(predicted, test, test_rows, eval_set))
    return block


def _scores(
    predicted: np.ndarray,
    test: TokenSet,
    test_rows: np.ndarray,
    rows: np.ndarray,
    train: TokenSet,
    args: Any,
) -> dict[str, Any]:
    """One training subset's entry: Dice and IoU with intervals, and the image counts."""
    true = test.masks[test_rows, 0].numpy() == 1
    dice, iou = region_scores(predicted, true)
    dice_mean, dice_ci = mean_with_interval(dice, args.bootstrap, args.seed)
    iou_mean, iou_ci = mean_with_interval(iou, args.bootstrap, args.seed)
    positives = int(train.has_region[rows].sum())
    return {
        "dice": dice_mean,
        "dice_ci": dice_ci,
        "iou": iou_mean,
        "iou_ci": iou_ci,
        "train_images": int(len(rows)),
        "train_positives": positives,
        "train_negatives": int(len(rows)) - positives,
        "test_images": int(len(test_rows)),
        "test_positives": int(true.reshape(len(true), -1).any(1).sum()),
    }


def _examples(
    predicted: np.ndarray, test: TokenSet, test_rows: np.ndarray, eval_set: MgllDataset
) -> dict[str, Any]:
    """A few test images (those with a region first), their true and predicted masks."""
    true = test.masks[test_rows, 0].numpy() == 1
    with_region = true.reshape(len(true), -1).any(1)
    order = np.concatenate([np.flatnonzero(with_region), np.flatnonzero(~with_region)])
    chosen = order[:EXAMPLES]
    samples = [eval_set[int(test_rows[i])] for i in chosen]
    dice, _ = region_scores(predicted[chosen], true[chosen])
    return {
        "images": np.stack([s["image"][0].numpy() for s in samples]) if samples else None,
        "true": true[chosen],
        "predicted": predicted[chosen],
        "ids": [s["id"] for s in samples],
        "dice": dice,
    }
