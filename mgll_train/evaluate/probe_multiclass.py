"""A linear probe for single-label classes (COVIDx's normal / pneumonia / COVID-19): accuracy.

The head is the project's linear probe (`probe.py`: one logistic output per class on the
frozen features, the same optimiser, schedule and patient-level 1 / 10 / 100 % subsets),
trained on one-hot targets; an image's class is its largest logit. Rows positive for none or
several of the classes are left out of training and scoring, and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..data import MgllDataset
from .features import Features, extract_features
from .metrics import multiclass_metrics, single_class
from .probe import PROBE_FRACTIONS, draw_patient_subset, linear_logits


def multiclass_probe_block(
    model: torch.nn.Module,
    train_set: MgllDataset,
    eval_set: MgllDataset,
    feats: Features,
    classes: Sequence[str],
    args: Any,
    device: torch.device,
    progress: bool | None = None,
) -> dict[str, Any]:
    """The ``linear_probe_multiclass`` block: accuracy (and macro F1) per training subset."""
    train = extract_features(
        model, train_set, args.batch_size, args.workers, device, texts=False, progress=progress
    )
    train_class = single_class(train.labels, train_set.label_names, classes)
    usable = np.flatnonzero(train_class >= 0)
    onehot = np.eye(len(classes), dtype=np.float32)[train_class[usable]]
    patients = [train.patients[i] for i in usable]
    truth = single_class(feats.labels, eval_set.label_names, classes)
    scored = truth >= 0
    block: dict[str, Any] = {
        "classes": list(classes),
        "epochs": args.probe_epochs,
        "train_left_out": int(len(train_class) - len(usable)),
        "test_left_out": int((~scored).sum()),
    }
    for fraction in PROBE_FRACTIONS:
        rows = draw_patient_subset(patients, onehot, fraction, args.seed).rows
        logits = linear_logits(train.image[usable][rows], onehot[rows], feats.image[scored], args)
        result = multiclass_metrics(
            truth[scored], logits.argmax(axis=1), classes, args.bootstrap, args.seed
        )
        block[f"{fraction:.0%}"] = result | {"train_images": int(len(rows))}
    return block
