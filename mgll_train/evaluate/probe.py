"""Linear probe (and `--finetune`) on patient-level training subsets of 1 %, 10 % and 100 %.

A `Linear(D, K)` head on the frozen, projected, unnormalised image features (the reference
protocol), BCE with NaN labels masked, AdamW(0.9, 0.95), weight decay 1e-3, batch 32, a fixed
number of epochs with a one-epoch warm-up and cosine decay. Features are computed once, so the
head's learning rate is 1e-3 (the reference's 1.25e-4 is for the augmented end-to-end regime,
which `--finetune` follows). Training subsets are drawn by patient (rows without `patient_id`
are their own patient) from a seeded shuffle; a smaller subset then gets, per label without a
positive, the first patient in the shuffled order that has one (when the split has one).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ..data import MgllDataset, collate
from ..data.normalize import model_input
from .features import Features, extract_features, patient_ids
from .metrics import macro_auroc_map

PROBE_FRACTIONS = (0.01, 0.1, 1.0)


@dataclass
class PatientSubset:
    """A training subset and how it was drawn (for the report)."""

    rows: np.ndarray  # sorted row indices
    target_rows: int  # ceil(fraction · N): rows the random draw stops at
    drawn_patients: int  # taken in the seeded order until target_rows
    added_patients: int  # then added so that every label with a positive in the split has one


def draw_patient_subset(
    patients: Sequence[str], labels: np.ndarray, fraction: float, seed: int
) -> PatientSubset:
    """A seeded patient-level subset of about ``fraction`` of the rows.

    Patients are taken in a seeded shuffled order until the subset holds ``ceil(fraction·N)``
    rows; then, for each label with no positive row in the subset but some in the split, the
    first patient (in the same order) with a positive row is added.
    """
    unique = sorted(set(patients))
    order = np.random.default_rng([seed, 7919]).permutation(len(unique))
    rows_of: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        rows_of.setdefault(p, []).append(i)
    target = math.ceil(fraction * len(patients))
    chosen: list[str] = []
    count = 0
    for i in order:
        if count >= target:
            break
        chosen.append(unique[i])
        count += len(rows_of[unique[i]])
    positive = np.nan_to_num(labels, nan=0.0) > 0
    selected = set(chosen)
    for j in range(labels.shape[1]):
        if not positive[:, j].any():
            continue
        if any(positive[rows_of[p], j].any() for p in selected):
            continue
        for i in order:
            if positive[rows_of[unique[i]], j].any():
                selected.add(unique[i])
                break
    rows = np.array(sorted(r for p in selected for r in rows_of[p]), dtype=np.int64)
    return PatientSubset(rows, target, len(chosen), len(selected) - len(chosen))


def patient_subset(
    patients: Sequence[str], labels: np.ndarray, fraction: float, seed: int
) -> np.ndarray:
    """Sorted row indices of :func:`draw_patient_subset`."""
    return draw_patient_subset(patients, labels, fraction, seed).rows


def _masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    mask = ~torch.isnan(labels)
    if not mask.any():
        return logits.sum() * 0
    return torch.nn.functional.binary_cross_entropy_with_logits(
        logits[mask], labels[mask].clamp(0, 1)
    )


def _schedule(optimizer: torch.optim.Optimizer, lr: float, warmup: int, total: int) -> Callable:
    def set_lr(step: int) -> None:
        if step < warmup:
            value = lr * (step + 1) / warmup
        else:
            progress = (step - warmup) / max(1, total - warmup)
            value = 0.5 * lr * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = value

    return set_lr


def train_linear_head(
    features: np.ndarray,
    labels: np.ndarray,
    epochs: int = 50,
    lr: float = 1e-3,
    batch_size: int = 32,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> torch.nn.Linear:
    """A linear head trained with masked BCE and AdamW on frozen ``features`` (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.float32))
    head = torch.nn.Linear(x.shape[1], y.shape[1])
    with torch.no_grad():
        bound = 1 / math.sqrt(x.shape[1])
        head.weight.uniform_(-bound, bound, generator=gen)
        head.bias.zero_()
    optimizer = torch.optim.AdamW(
        head.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay
    )
    per_epoch = max(1, math.ceil(len(x) / batch_size))
    set_lr = _schedule(optimizer, lr, per_epoch, per_epoch * epochs)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = perm[start : start + batch_size]
            set_lr(step)
            loss = _masked_bce(head(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 10.0)
            optimizer.step()
            step += 1
    return head


class _Classifier(torch.nn.Module):
    def __init__(self, visual: torch.nn.Module, dim: int, classes: int):
        super().__init__()
        self.visual = visual
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(images))


def finetune_and_score(
    model: torch.nn.Module,
    train_set: Any,
    rows: np.ndarray,
    eval_set: Any,
    num_labels: int,
    args: Any,
    device: torch.device,
) -> np.ndarray:
    """Full fine-tuning of a copy of the image tower with a linear head; eval-split logits."""
    torch.manual_seed(args.seed)
    visual = copy.deepcopy(model.visual).to(device)
    for p in visual.parameters():
        p.requires_grad_(True)
    dim = int(model.encode_image(model_input(eval_set[0]["image"][None], model, device)).shape[-1])
    net = _Classifier(visual, dim, num_labels).to(device)
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=args.finetune_lr, betas=(0.9, 0.95), weight_decay=1e-3
    )
    gen = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(
        Subset(train_set, rows.tolist()),
        batch_size=32,
        shuffle=True,
        generator=gen,
        num_workers=args.workers,
        collate_fn=collate,
    )
    per_epoch = len(loader)
    set_lr = _schedule(optimizer, args.finetune_lr, per_epoch, per_epoch * args.probe_epochs)
    step = 0
    net.train()
    for _ in range(args.probe_epochs):
        for batch in loader:
            set_lr(step)
            images = model_input(batch["images"], model, device)
            loss = _masked_bce(net(images), batch["labels"].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
            optimizer.step()
            step += 1
    net.eval()
    out = []
    with torch.no_grad():
        for batch in DataLoader(eval_set, batch_size=args.batch_size, collate_fn=collate):
            out.append(net(model_input(batch["images"], model, device)).float().cpu())
    return torch.cat(out).numpy()


def align_labels(
    labels: np.ndarray, from_names: Sequence[str], to_names: Sequence[str]
) -> np.ndarray:
    """``labels`` on ``from_names`` re-indexed onto ``to_names`` (missing: NaN)."""
    out = np.full((len(labels), len(to_names)), np.nan, dtype=np.float32)
    position = {n: i for i, n in enumerate(from_names)}
    for j, name in enumerate(to_names):
        if name in position:
            out[:, j] = labels[:, position[name]]
    return out


def linear_logits(
    train_features: np.ndarray, train_labels: np.ndarray, eval_features: np.ndarray, args: Any
) -> np.ndarray:
    """Eval-split logits of a linear head trained on the frozen training features."""
    head = train_linear_head(
        train_features, train_labels, epochs=args.probe_epochs, lr=args.probe_lr, seed=args.seed
    )
    with torch.no_grad():
        return head(torch.from_numpy(eval_features)).numpy()


def probe_block(
    model: torch.nn.Module,
    train_set: MgllDataset,
    eval_set: MgllDataset,
    feats: Features,
    train_data: str,
    train_split: str,
    args: Any,
    device: torch.device,
    progress: bool | None = None,
) -> dict[str, Any]:
    """The ``linear_probe`` block of metrics.json: macro AUROC and mAP per training subset."""
    names = eval_set.label_names
    if args.finetune:  # fine-tuning reads the images itself: only patients and labels here
        train_feats = None
        patients = patient_ids(train_set)
        labels = np.stack([train_set[i]["labels"].numpy() for i in range(len(train_set))])
    else:
        train_feats = extract_features(
            model, train_set, args.batch_size, args.workers, device, texts=False, progress=progress
        )
        patients, labels = train_feats.patients, train_feats.labels
    labels = align_labels(labels, train_set.label_names, names)
    probe: dict[str, Any] = {
        "mode": "finetune" if args.finetune else "linear",
        "train_data": train_data,
        "train_split": train_split,
        "epochs": args.probe_epochs,
    }
    for fraction in PROBE_FRACTIONS:
        subset = draw_patient_subset(patients, labels, fraction, args.seed)
        rows = subset.rows
        if train_feats is None:
            logits = finetune_and_score(model, train_set, rows, eval_set, len(names), args, device)
        else:
            logits = linear_logits(train_feats.image[rows], labels[rows], feats.image, args)
        # fit's evaluation runs no probe; its args have no --bootstrap
        bootstrap = getattr(args, "bootstrap", 0)
        result = macro_auroc_map(feats.labels, logits, names, bootstrap, args.seed)
        result |= {
            "train_images": int(len(rows)),
            "train_patients": len({patients[r] for r in rows}),
            "target_images": subset.target_rows,
            "patients_added_for_labels": subset.added_patients,
        }
        probe[f"{fraction:.0%}"] = result
    return probe
