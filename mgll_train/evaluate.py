"""`mgll-train eval`: zero-shot classification, linear probe and label-aware retrieval (DESIGN §9).

Decisions (documented here because the tests and the benchmark rely on them):

* Metrics are computed here with numpy (AUROC as the tie-aware Mann–Whitney statistic, average
  precision as scikit-learn's step-wise sum); the tests check them against scikit-learn.
* Bootstrap CIs: images are resampled with replacement (``--bootstrap`` resamples, seeded);
  each resample is a vector of multiplicities, so one sort per label serves every resample. The
  95 % interval is the 2.5/97.5 percentiles; resamples in which a label has one class only are
  left out of that label's interval.
* Labels: by default an image whose label is NaN or −1 is left out of that label's score
  (``--uncertain ignore --unmentioned ignore``; the training flags' values can be given
  instead). A label without both classes among the remaining images is reported as skipped.
* Zero-shot: per label, the positive and negative prompts of the vocabulary
  (``schemas/<domain>.yaml``, the domain from the dataset's ``mgll`` metadata) are embedded,
  normalised, averaged and re-normalised (a prompt ensemble); an image's score is
  ``cos(v, pos) − cos(v, neg)``, which ranks images exactly as the softmax over the two does.
* Linear probe: a ``Linear(D, K)`` head on the frozen, projected, unnormalised image features
  (the reference protocol), BCE with NaN labels masked, AdamW(0.9, 0.95), weight decay 1e-3,
  batch 32, a fixed number of epochs with a one-epoch warm-up and cosine decay. Features are
  computed once, so the head's learning rate is 1e-3 (the reference's 1.25e-4 is for the
  augmented end-to-end regime, which ``--finetune`` follows). Training subsets (1 %, 10 %,
  100 %) are drawn by patient (rows without ``patient_id`` are their own patient) from a seeded
  shuffle; a smaller subset then gets, per label without a positive, the first patient in the
  shuffled order that has one (when the split has one).
* Retrieval over the split's category texts, one text per image (duplicates kept, as in CLIP's
  retrieval protocol). A hit at k: one of the top-k items has exactly the query's set of
  positive labels. Chance level per query with n items of its label set among N is
  ``1 − C(N−n, k)/C(N, k)``, averaged over the queries. Graded mAP: relevance is the Jaccard
  overlap of the positive label sets (two empty sets: 1), AP = Σ_k rel_k·(Σ_{j≤k} rel_j / k) /
  Σ rel, which is ordinary AP for 0/1 relevance.
* Deterministic for a seed: the loader reads the split in file order, the head's initialisation,
  batches and the subsets are seeded, and the model runs in eval mode on one thread order.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

log = logging.getLogger("mgll_train")

TASKS = ("zeroshot", "linear-probe", "retrieval")
CHEXPERT5 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
PROBE_FRACTIONS = (0.01, 0.1, 1.0)
RECALL_KS = (1, 5, 10)

# ------------------------------------------------------------------------------------ metrics


def _tie_groups(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(order, starts)``: ascending stable order and where each run of equal scores begins."""
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return order, starts


def weighted_auroc(y: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of ``scores`` for binary ``y`` ``[n]`` under each row of ``weights`` ``[B, n]``.

    The probability that a positive outscores a negative, ties counting one half (the
    Mann–Whitney statistic, as ``sklearn.metrics.roc_auc_score``), with each image counted
    ``weights[b, i]`` times. NaN where a row has no positive or no negative weight.
    """
    y = np.asarray(y).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order, starts = _tie_groups(scores)
    w = weights[:, order]
    pos = np.add.reduceat(w * y[order], starts, axis=1)
    neg = np.add.reduceat(w * ~y[order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def auroc(y: np.ndarray, scores: np.ndarray) -> float:
    """AUROC (NaN when ``y`` lacks a class)."""
    return float(weighted_auroc(y, scores, np.ones((1, len(y))))[0])


def average_precision(y: np.ndarray, scores: np.ndarray) -> float:
    """Average precision as ``sklearn.metrics.average_precision_score`` (NaN without positives)."""
    y = np.asarray(y).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if not y.any():
        return float("nan")
    order, starts = _tie_groups(-scores)  # descending scores
    tp = np.add.reduceat(y[order].astype(np.float64), starts)
    count = np.diff(np.r_[starts, len(y)]).astype(np.float64)
    tp_cum, all_cum = np.cumsum(tp), np.cumsum(count)
    precision = tp_cum / all_cum
    recall = tp_cum / tp_cum[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_curve(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` at every distinct threshold, from (0, 0) to (1, 1)."""
    y = np.asarray(y).astype(bool)
    order, starts = _tie_groups(-np.asarray(scores, dtype=np.float64))
    tp = np.cumsum(np.add.reduceat(y[order].astype(float), starts))
    fp = np.cumsum(np.add.reduceat((~y[order]).astype(float), starts))
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def bootstrap_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """``[resamples, n]`` multiplicities of a seeded bootstrap of ``n`` items."""
    rng = np.random.default_rng([seed, n])
    return np.stack(
        [np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)]
    ).astype(np.float64)


def percentile_ci(values: np.ndarray, level: float = 0.95) -> list[float | None]:
    """The percentile interval of the finite ``values`` (None, None when there are none)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return [None, None]
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))]


def multilabel_auroc(
    labels: np.ndarray,
    scores: np.ndarray,
    names: Sequence[str],
    bootstrap: int = 1000,
    seed: int = 0,
    usable: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Per-label AUROC with bootstrap CIs, macro AUROC and the CheXpert-five mean.

    ``labels`` ``[N, K]`` holds 1/0 and NaN (left out). ``usable[k]`` False marks a label as
    skipped for another reason (no prompts). Returns the ``zeroshot`` block of metrics.json.
    """
    n, k = labels.shape
    weights = bootstrap_weights(n, bootstrap, seed) if bootstrap > 0 else np.zeros((0, n))
    per_label: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    boots: dict[str, np.ndarray] = {}
    for j, name in enumerate(names):
        if usable is not None and not usable[j]:
            skipped[name] = "no prompts in the vocabulary"
            continue
        keep = ~np.isnan(labels[:, j])
        y = labels[keep, j] > 0
        n_pos, n_neg = int(y.sum()), int((~y).sum())
        if n_pos == 0 and n_neg == 0:
            skipped[name] = "not annotated in this split"
            continue
        if n_pos == 0 or n_neg == 0:
            skipped[name] = f"one class only ({n_pos} positive, {n_neg} negative)"
            continue
        point = auroc(y, scores[keep, j])
        boot = weighted_auroc(y, scores[keep, j], weights[:, keep]) if len(weights) else np.zeros(0)
        boots[name] = boot
        per_label[name] = {
            "auroc": point,
            "ci95": percentile_ci(boot),
            "positives": n_pos,
            "negatives": n_neg,
        }

    def mean_of(selected: list[str]) -> tuple[float | None, list[float | None]]:
        if not selected:
            return None, [None, None]
        point = float(np.mean([per_label[s]["auroc"] for s in selected]))
        if not len(weights):
            return point, [None, None]
        with np.errstate(invalid="ignore"):
            stacked = np.stack([boots[s] for s in selected])
            means = np.where(np.isnan(stacked).any(axis=0), np.nan, stacked.mean(axis=0))
        return point, percentile_ci(means)

    macro, macro_ci = mean_of(list(per_label))
    five = [s for s in CHEXPERT5 if s in per_label]
    chex, chex_ci = mean_of(five)
    return {
        "per_label": per_label,
        "skipped": skipped,
        "macro_auroc": macro,
        "macro_auroc_ci95": macro_ci,
        "chexpert5_auroc": chex if len(five) == len(CHEXPERT5) else None,
        "chexpert5_auroc_ci95": chex_ci if len(five) == len(CHEXPERT5) else [None, None],
        "chexpert5_labels": five,
        "bootstrap": bootstrap,
    }


def macro_auroc_map(labels: np.ndarray, scores: np.ndarray, names: Sequence[str]) -> dict:
    """Macro AUROC and mAP over the labels with both classes (NaN labels left out)."""
    aurocs, aps, used = [], [], []
    for j, name in enumerate(names):
        keep = ~np.isnan(labels[:, j])
        y = labels[keep, j] > 0
        if y.all() or not y.any():
            continue
        aurocs.append(auroc(y, scores[keep, j]))
        aps.append(average_precision(y, scores[keep, j]))
        used.append(name)
    return {
        "macro_auroc": float(np.mean(aurocs)) if aurocs else None,
        "map": float(np.mean(aps)) if aps else None,
        "labels": used,
    }


# ---------------------------------------------------------------------------------- retrieval


def label_set_keys(labels: np.ndarray) -> np.ndarray:
    """One integer per row identifying its exact set of positive labels."""
    positive = np.nan_to_num(labels, nan=0.0) > 0
    _, keys = np.unique(positive, axis=0, return_inverse=True)
    return keys.reshape(-1)


def chance_recall(keys: np.ndarray, k: int) -> float:
    """Expected Recall@k of a random ranking of all N items, hits by equal key.

    A query whose key has n items among N misses with probability C(N−n, k)/C(N, k).
    """
    n_total = len(keys)
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    k = min(k, n_total)
    per_key = []
    for n in counts:
        miss = 1.0
        for j in range(k):
            miss *= max(n_total - n - j, 0) / (n_total - j)
        per_key.append(1.0 - miss)
    return float(np.mean(np.asarray(per_key)[inverse]))


def retrieval_metrics(
    query: np.ndarray,
    gallery: np.ndarray,
    keys: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = RECALL_KS,
    chunk: int = 512,
    query_keys: np.ndarray | None = None,
    query_labels: np.ndarray | None = None,
) -> dict[str, float]:
    """Recall@k (hit: same label-set key) and Jaccard-graded mAP of ``query`` against ``gallery``.

    Row i of ``gallery`` belongs to item i (``keys`` and ``labels`` ``[N, K]``); the queries
    are the same items unless ``query_keys``/``query_labels`` say otherwise. Rankings are by
    descending similarity, ties broken by gallery position (stable).
    """
    from .loss import label_cooccurrence

    q = torch.from_numpy(np.asarray(query, dtype=np.float32))
    g = torch.from_numpy(np.asarray(gallery, dtype=np.float32))
    key_t = torch.from_numpy(np.asarray(keys))
    lab = torch.from_numpy(np.asarray(labels, dtype=np.float32))
    q_key = key_t if query_keys is None else torch.from_numpy(np.asarray(query_keys))
    q_lab = lab if query_labels is None else torch.from_numpy(np.asarray(query_labels, np.float32))
    n = len(q)
    if len(q_key) != n or len(q_lab) != n or len(key_t) != len(g):
        raise ValueError("retrieval_metrics: keys/labels must match the query and gallery rows")
    hits = {k: 0.0 for k in ks}
    ap_sum = 0.0
    positions = torch.arange(1, len(g) + 1, dtype=torch.float64)
    for start in range(0, n, chunk):
        sim = q[start : start + chunk] @ g.T
        order = torch.sort(-sim, dim=1, stable=True).indices
        same = key_t[order] == q_key[start : start + chunk, None]
        for k in ks:
            hits[k] += float(same[:, :k].any(dim=1).sum())
        rel = label_cooccurrence(q_lab[start : start + chunk], lab).double()
        rel = torch.gather(rel, 1, order)
        precision = torch.cumsum(rel, dim=1) / positions
        total = rel.sum(dim=1)
        ap = (rel * precision).sum(dim=1) / total.clamp_min(1e-12)
        ap_sum += float(torch.where(total > 0, ap, torch.zeros_like(ap)).sum())
    out = {f"R@{k}": hits[k] / n for k in ks}
    out["graded_map"] = ap_sum / n
    return out


def retrieval_block(
    image_features: np.ndarray, text_features: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    """The ``retrieval`` block of metrics.json (features L2-normalised here)."""
    img = image_features / np.linalg.norm(image_features, axis=1, keepdims=True)
    txt = text_features / np.linalg.norm(text_features, axis=1, keepdims=True)
    keys = label_set_keys(labels)
    chance = {f"R@{k}": chance_recall(keys, k) for k in RECALL_KS}
    return {
        "image_to_text": retrieval_metrics(img, txt, keys, labels),
        "text_to_image": retrieval_metrics(txt, img, keys, labels),
        "chance": chance,
        "label_sets": int(len(np.unique(keys))),
        "items": int(len(keys)),
    }


# ----------------------------------------------------------------------------------- features


@dataclass
class Features:
    """What one pass of the model over a split gives."""

    image: np.ndarray  # [N, D] projected, unnormalised
    text: np.ndarray | None  # [N, D] category text features, unnormalised (or None)
    labels: np.ndarray  # [N, K] 1/0/NaN after the label policy
    ids: list[str]
    patients: list[str]


def _patients(dataset: Any) -> list[str]:
    """``patient_id`` of each row of a map-style dataset (the row id when missing)."""
    records = dataset.records
    per_file: dict[int, tuple[np.ndarray, list]] = {}
    for f, path in enumerate(records.files):
        meta = pq.read_metadata(path)
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        names = pq.read_schema(path).names
        cols = ["id", "patient_id"] if "patient_id" in names else ["id"]
        table = pq.read_table(path, columns=cols).to_pydict()
        pids = table.get("patient_id") or [None] * len(table["id"])
        per_file[f] = (starts, [p if p else i for p, i in zip(pids, table["id"], strict=True)])
    out = []
    for file, group, row in records.index:
        starts, pids = per_file[int(file)]
        out.append(str(pids[int(starts[group] + row)]))
    return out


def eval_transform(bundle_model: torch.nn.Module, tokenizer: Any, args: Any) -> Any:
    from .data import SampleTransform

    return SampleTransform.from_model(
        bundle_model,
        tokenizer,
        granularities=("category",),
        uncertain=args.uncertain,
        unmentioned=args.unmentioned,
    )


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    dataset: Any,
    batch_size: int,
    workers: int,
    device: torch.device,
    texts: bool = True,
) -> Features:
    """Image (and category-text) features of every row, in dataset order."""
    from torch.utils.data import DataLoader

    from .data import collate

    was_training = model.training
    model.eval()
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate
    )
    images, text_feats, labels, ids = [], [], [], []
    for batch in loader:
        images.append(model.encode_image(batch["images"].to(device), normalize=False).float().cpu())
        if texts:
            tokens = batch["texts"][0].to(device)
            text_feats.append(model.encode_text(tokens, normalize=False).float().cpu())
        labels.append(batch["labels"])
        ids.extend(batch["ids"])
    model.train(was_training)
    return Features(
        image=torch.cat(images).numpy(),
        text=torch.cat(text_feats).numpy() if texts else None,
        labels=torch.cat(labels).numpy(),
        ids=ids,
        patients=_patients(dataset),
    )


# ----------------------------------------------------------------------------------- zero-shot


def vocabulary_prompts(domain: str) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """``{label: (positive prompts, negative prompts)}`` of a domain's vocabulary."""
    from mgll_data.vocab import load_vocabulary  # lazily: only the prompts come from mgll_data

    vocab = load_vocabulary(domain)
    return {lab.name: (lab.positive_prompts, lab.negative_prompts) for lab in vocab.labels}


@torch.no_grad()
def prompt_embeddings(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], device: torch.device
) -> torch.Tensor:
    """The normalised mean of the normalised embeddings of ``prompts`` ([D])."""
    from .data import TextTokenizer

    tok = TextTokenizer(tokenizer)
    tokens = torch.stack([tok.tokenize(p)[0] for p in prompts]).to(device)
    emb = model.encode_text(tokens, normalize=True).float().mean(dim=0)
    return emb / emb.norm()


def zeroshot_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    image_features: np.ndarray,
    label_names: Sequence[str],
    prompts: dict[str, tuple[Sequence[str], Sequence[str]]],
    device: torch.device,
) -> tuple[np.ndarray, list[bool]]:
    """``([N, K] scores, usable)``: cos(v, positive ensemble) − cos(v, negative ensemble)."""
    was_training = model.training
    model.eval()
    img = torch.from_numpy(image_features)
    img = img / img.norm(dim=1, keepdim=True)
    scores = np.zeros((len(img), len(label_names)), dtype=np.float64)
    usable = []
    for j, name in enumerate(label_names):
        pos, neg = prompts.get(name, ((), ()))
        if not pos or not neg:
            usable.append(False)
            continue
        p = prompt_embeddings(model, tokenizer, pos, device).cpu()
        q = prompt_embeddings(model, tokenizer, neg, device).cpu()
        scores[:, j] = (img @ p - img @ q).double().numpy()
        usable.append(True)
    model.train(was_training)
    return scores, usable


# ------------------------------------------------------------------------------- linear probe


def patient_subset(
    patients: Sequence[str], labels: np.ndarray, fraction: float, seed: int
) -> np.ndarray:
    """Sorted row indices of a seeded patient-level subset of about ``fraction`` of the rows.

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
    return np.array(sorted(r for p in selected for r in rows_of[p]), dtype=np.int64)


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
    from torch.utils.data import DataLoader, Subset

    from .data import collate

    torch.manual_seed(args.seed)
    visual = copy.deepcopy(model.visual).to(device)
    for p in visual.parameters():
        p.requires_grad_(True)
    dim = int(model.encode_image(eval_set[0]["image"][None].to(device)).shape[-1])
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
            loss = _masked_bce(net(batch["images"].to(device)), batch["labels"].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
            optimizer.step()
            step += 1
    net.eval()
    out = []
    with torch.no_grad():
        for batch in DataLoader(eval_set, batch_size=args.batch_size, collate_fn=collate):
            out.append(net(batch["images"].to(device)).float().cpu())
    return torch.cat(out).numpy()


# ---------------------------------------------------------------------------------- the runner


def _align(labels: np.ndarray, from_names: Sequence[str], to_names: Sequence[str]) -> np.ndarray:
    """``labels`` on ``from_names`` re-indexed onto ``to_names`` (missing: NaN)."""
    out = np.full((len(labels), len(to_names)), np.nan, dtype=np.float32)
    position = {n: i for i, n in enumerate(from_names)}
    for j, name in enumerate(to_names):
        if name in position:
            out[:, j] = labels[:, position[name]]
    return out


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
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``tasks`` on ``data``/``split``; return ``(metrics, extras for the plots)``."""
    from .data import make_dataset, read_mgll_metadata

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown eval tasks {unknown}; use {','.join(TASKS)}")
    started = time.time()
    transform = eval_transform(model, tokenizer, args)
    dataset = make_dataset(data, transform, split=split, seed=args.seed)
    names = dataset.label_names
    feats = extract_features(
        model, dataset, args.batch_size, args.workers, device, texts="retrieval" in tasks
    )
    metrics: dict[str, Any] = {"data": data, "split": split, "images": len(feats.ids)}
    extras: dict[str, Any] = {"labels": feats.labels, "names": names}
    if "zeroshot" in tasks:
        domain = read_mgll_metadata(dataset.records.files[0]).get("domain", "chest_xray")
        scores, usable = zeroshot_scores(
            model, tokenizer, feats.image, names, vocabulary_prompts(domain), device
        )
        metrics["zeroshot"] = multilabel_auroc(
            feats.labels, scores, names, args.bootstrap, args.seed, usable
        )
        metrics["zeroshot"]["domain"] = domain
        extras["zeroshot_scores"] = scores
    if "retrieval" in tasks:
        metrics["retrieval"] = retrieval_block(feats.image, feats.text, feats.labels)
    if "linear-probe" in tasks:
        if not train_data:
            raise ValueError(
                "linear-probe needs training data: the checkpoint names none; give --train-data"
            )
        train_set = make_dataset(train_data, transform, split=train_split, seed=args.seed)
        train_feats = (
            None
            if args.finetune
            else extract_features(
                model, train_set, args.batch_size, args.workers, device, texts=False
            )
        )
        train_patients = train_feats.patients if train_feats else _patients(train_set)
        if train_feats is not None:
            train_labels = train_feats.labels
        else:
            train_labels = np.stack([train_set[i]["labels"].numpy() for i in range(len(train_set))])
        train_labels = _align(train_labels, train_set.label_names, names)
        probe: dict[str, Any] = {
            "mode": "finetune" if args.finetune else "linear",
            "train_data": train_data,
            "train_split": train_split,
            "epochs": args.probe_epochs,
        }
        for fraction in PROBE_FRACTIONS:
            rows = patient_subset(train_patients, train_labels, fraction, args.seed)
            if args.finetune:
                logits = finetune_and_score(
                    model, train_set, rows, dataset, len(names), args, device
                )
            else:
                head = train_linear_head(
                    train_feats.image[rows],
                    train_labels[rows],
                    epochs=args.probe_epochs,
                    lr=args.probe_lr,
                    seed=args.seed,
                )
                with torch.no_grad():
                    logits = head(torch.from_numpy(feats.image)).numpy()
            result = macro_auroc_map(feats.labels, logits, names)
            result |= {
                "train_images": int(len(rows)),
                "train_patients": len({train_patients[r] for r in rows}),
            }
            probe[f"{fraction:.0%}"] = result
        metrics["linear_probe"] = probe
    metrics["seconds"] = round(time.time() - started, 2)
    return metrics, extras


# -------------------------------------------------------------------------------------- output


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf → None, numpy scalars → Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _fmt(value: float | None, digits: int = 3) -> str:
    return "  n/a" if value is None else f"{value:.{digits}f}"


def format_table(metrics: dict[str, Any]) -> str:
    """A readable summary of metrics.json."""
    lines = [
        f"evaluation of {metrics.get('checkpoint', '?')} on {metrics['data']} "
        f"[{metrics['split']}], {metrics['images']} images"
    ]
    zs = metrics.get("zeroshot")
    if zs:
        lines += [
            "",
            "zero-shot AUROC (95 % bootstrap CI)",
            f"  {'label':28} AUROC  CI          pos/neg",
        ]
        for name, r in zs["per_label"].items():
            lo, hi = r["ci95"]
            lines.append(
                f"  {name:28} {_fmt(r['auroc'])}  [{_fmt(lo)}, {_fmt(hi)}]  "
                f"{r['positives']}/{r['negatives']}"
            )
        lo, hi = zs["macro_auroc_ci95"]
        lines.append(f"  {'macro':28} {_fmt(zs['macro_auroc'])}  [{_fmt(lo)}, {_fmt(hi)}]")
        lo, hi = zs["chexpert5_auroc_ci95"]
        lines.append(
            f"  {'CheXpert five':28} {_fmt(zs['chexpert5_auroc'])}  [{_fmt(lo)}, {_fmt(hi)}]"
        )
        for name, why in zs["skipped"].items():
            lines.append(f"  {name:28} skipped: {why}")
    lp = metrics.get("linear_probe")
    if lp:
        lines += ["", f"{lp['mode']} probe ({lp['epochs']} epochs)   macro AUROC   mAP   images"]
        for key in (f"{f:.0%}" for f in PROBE_FRACTIONS):
            r = lp[key]
            lines.append(
                f"  {key:>5} of {lp['train_split']:10} {_fmt(r['macro_auroc']):>10}  "
                f"{_fmt(r['map'])}  {r['train_images']}"
            )
    rt = metrics.get("retrieval")
    if rt:
        lines += ["", f"label-aware retrieval ({rt['items']} items, {rt['label_sets']} label sets)"]
        lines.append("  direction        R@1    R@5    R@10   graded mAP")
        for key in ("image_to_text", "text_to_image", "chance"):
            r = rt[key]
            lines.append(
                f"  {key:15} {_fmt(r['R@1'])}  {_fmt(r['R@5'])}  {_fmt(r['R@10'])}  "
                f"{_fmt(r.get('graded_map'))}"
            )
    return "\n".join(lines)


def write_plots(metrics: dict[str, Any], extras: dict[str, Any], out: Path) -> list[Path]:
    """ROC curves per label and per-label AUROC bars with CIs (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zs = metrics.get("zeroshot")
    if not zs or not zs["per_label"]:
        return []
    written = []
    names = list(zs["per_label"])
    labels, scores, all_names = extras["labels"], extras["zeroshot_scores"], extras["names"]
    fig, ax = plt.subplots(figsize=(6, 6))
    for name in names:
        j = all_names.index(name)
        keep = ~np.isnan(labels[:, j])
        fpr, tpr = roc_curve(labels[keep, j] > 0, scores[keep, j])
        ax.plot(fpr, tpr, lw=1, label=f"{name} ({zs['per_label'][name]['auroc']:.2f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="zero-shot ROC")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path = out / "roc_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names) + 2), 4))
    values = [zs["per_label"][n]["auroc"] for n in names]
    ci = [zs["per_label"][n]["ci95"] for n in names]
    ax.bar(range(len(names)), values, color="#4c72b0")
    # A percentile interval need not contain the point estimate (few resamples, small splits):
    # draw each interval about its own midpoint, so [lo, hi] is shown as it is.
    spans = [(x, c) for x, c in enumerate(ci) if c[0] is not None and c[1] is not None]
    if spans:
        ax.errorbar(
            [x for x, _ in spans],
            [(lo + hi) / 2 for _, (lo, hi) in spans],
            yerr=[(hi - lo) / 2 for _, (lo, hi) in spans],
            fmt="none",
            ecolor="k",
            capsize=3,
        )
    ax.axhline(0.5, color="k", ls="--", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set(ylim=(0, 1), ylabel="AUROC", title="zero-shot AUROC per label (95 % CI)")
    fig.tight_layout()
    path = out / "auroc_per_label.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written


# ------------------------------------------------------------------------------------- the CLI


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `mgll-train eval`."""
    parser.add_argument("--checkpoint", type=Path, required=True, help="a .pt checkpoint")
    parser.add_argument("--data", required=True, help="dataset to evaluate on (as --train-data)")
    parser.add_argument("--split", default="test", help="value of the split column (test)")
    parser.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help="comma-separated: zeroshot,linear-probe,retrieval (all)",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics.json and plots")
    parser.add_argument(
        "--train-data",
        default=None,
        help="linear-probe training data (default: the checkpoint's training data)",
    )
    parser.add_argument("--train-split", default=None, help="its split (the checkpoint's: train)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--uncertain",
        choices=("ignore", "positive", "negative"),
        default="ignore",
        help="what -1 labels become (ignore: left out)",
    )
    parser.add_argument(
        "--unmentioned",
        choices=("ignore", "negative"),
        default="ignore",
        help="what NaN labels become (ignore: left out)",
    )
    parser.add_argument("--probe-epochs", type=int, default=50, help="probe epochs (50)")
    parser.add_argument("--probe-lr", type=float, default=1e-3, help="linear head lr (1e-3)")
    parser.add_argument("--finetune", action="store_true", help="fine-tune the image tower too")
    parser.add_argument(
        "--finetune-lr", type=float, default=1.25e-4, help="fine-tuning lr (1.25e-4)"
    )


def load_model_from_checkpoint(path: Path, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """``(ModelBundle, checkpoint)`` with the checkpoint's weights loaded."""
    from .checkpoint import load_checkpoint
    from .model import create_model

    state = load_checkpoint(Path(path))
    has_bias = any(k == "logit_bias" for k in state["state_dict"])
    bundle = create_model(
        state["model_name"], None, device=device, init_logit_bias=-10.0 if has_bias else None
    )
    bundle.model.load_state_dict(state["state_dict"])
    bundle.model.eval()
    return bundle, state


def eval_device(name: str) -> torch.device:
    """``--device`` read as ``fit`` reads it: a known accelerator that is not available here
    falls back to the CPU; a name torch does not know is an error (not silently the CPU)."""
    from open_clip_train.distributed import is_device_available

    try:
        available, known = is_device_available(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a torch device ({err})") from err
    if known and not available:
        log.warning("--device %s is not available here; evaluating on the CPU", name)
        return torch.device("cpu")
    return torch.device(name)


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """`mgll-train eval`: write metrics.json, plots; print the table; return the metrics."""
    torch.manual_seed(args.seed)
    device = eval_device(args.device)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bundle, state = load_model_from_checkpoint(args.checkpoint, device)
    config = state.get("config") or {}
    train_data = args.train_data or state.get("train_data")
    train_split = args.train_split or config.get("train-split", "train")
    metrics, extras = evaluate_model(
        bundle.model,
        bundle.tokenizer,
        args.data,
        args.split,
        tasks,
        args,
        device,
        train_data=train_data,
        train_split=train_split,
    )
    metrics = {
        "checkpoint": str(args.checkpoint),
        "model": state["model_name"],
        "step": state.get("step"),
        "seed": args.seed,
        **metrics,
    }
    metrics.pop("seconds", None)  # keep metrics.json identical across runs
    args.out.mkdir(parents=True, exist_ok=True)
    clean = _clean(metrics)
    (args.out / "metrics.json").write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
    table = format_table(clean)
    (args.out / "table.txt").write_text(table + "\n")
    write_plots(clean, extras, args.out)
    print(table)
    return clean


def clean_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy of an evaluation's metrics (for metrics.jsonl)."""
    return _clean(metrics)
