"""Classification metrics in numpy: AUROC, average precision, ROC curves, bootstrap intervals.

AUROC is the tie-aware Mann–Whitney statistic and average precision scikit-learn's step-wise
sum; the tests check both against scikit-learn. Bootstrap CIs resample images with replacement
(seeded); each resample is a vector of multiplicities, so one sort per label serves every
resample. The 95 % interval is the 2.5/97.5 percentiles; resamples in which a label has one
class only are left out of that label's interval. By default an image whose label is NaN or −1
is left out of that label's score; a label without both classes among the remaining images is
reported as skipped, and one with fewer than `--min-support` positives or negatives is scored
but marked as low support.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

CHEXPERT5 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


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


def mean_interval(boots: Sequence[np.ndarray]) -> list[float | None]:
    """The percentile interval of the per-resample mean of several labels' bootstrap values
    (a resample where any label is NaN is left out); None, None without resamples."""
    if not boots or not len(boots[0]):
        return [None, None]
    with np.errstate(invalid="ignore"):
        stacked = np.stack(boots)
        means = np.where(np.isnan(stacked).any(axis=0), np.nan, stacked.mean(axis=0))
    return percentile_ci(means)


def multilabel_auroc(
    labels: np.ndarray,
    scores: np.ndarray,
    names: Sequence[str],
    bootstrap: int = 1000,
    seed: int = 0,
    usable: Sequence[bool] | None = None,
    min_support: int = 0,
) -> dict[str, Any]:
    """Per-label AUROC with bootstrap CIs, macro AUROC and the CheXpert-five mean.

    ``labels`` ``[N, K]`` holds 1/0 and NaN (left out). ``usable[k]`` False marks a label as
    skipped for another reason (no prompts). A label with fewer than ``min_support`` positives
    or negatives is scored but marked ``low_support``: ``macro_auroc`` keeps it (comparable
    with other reports), ``macro_auroc_supported`` leaves it out. Returns the ``zeroshot``
    block of metrics.json.
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
            "low_support": min(n_pos, n_neg) < min_support,
        }

    def mean_of(selected: list[str]) -> tuple[float | None, list[float | None]]:
        if not selected:
            return None, [None, None]
        point = float(np.mean([per_label[s]["auroc"] for s in selected]))
        return point, mean_interval([boots[s] for s in selected])

    macro, macro_ci = mean_of(list(per_label))
    supported, supported_ci = mean_of([s for s, r in per_label.items() if not r["low_support"]])
    five = [s for s in CHEXPERT5 if s in per_label]
    chex, chex_ci = mean_of(five)
    return {
        "per_label": per_label,
        "skipped": skipped,
        "macro_auroc": macro,
        "macro_auroc_ci95": macro_ci,
        "macro_auroc_supported": supported,
        "macro_auroc_supported_ci95": supported_ci,
        "min_support": min_support,
        "chexpert5_auroc": chex if len(five) == len(CHEXPERT5) else None,
        "chexpert5_auroc_ci95": chex_ci if len(five) == len(CHEXPERT5) else [None, None],
        "chexpert5_labels": five,
        "bootstrap": bootstrap,
    }


def macro_auroc_map(
    labels: np.ndarray,
    scores: np.ndarray,
    names: Sequence[str],
    bootstrap: int = 0,
    seed: int = 0,
) -> dict:
    """Macro AUROC and mAP over the labels with both classes (NaN labels left out); with
    ``bootstrap`` resamples of the images, also the macro AUROC's 95 % interval."""
    weights = bootstrap_weights(len(labels), bootstrap, seed) if bootstrap > 0 else None
    aurocs, aps, used, boots = [], [], [], []
    for j, name in enumerate(names):
        keep = ~np.isnan(labels[:, j])
        y = labels[keep, j] > 0
        if y.all() or not y.any():
            continue
        aurocs.append(auroc(y, scores[keep, j]))
        aps.append(average_precision(y, scores[keep, j]))
        used.append(name)
        if weights is not None:
            boots.append(weighted_auroc(y, scores[keep, j], weights[:, keep]))
    out = {
        "macro_auroc": float(np.mean(aurocs)) if aurocs else None,
        "map": float(np.mean(aps)) if aps else None,
        "labels": used,
    }
    if weights is not None:
        out["macro_auroc_ci95"] = mean_interval(boots)
    return out


def single_class(labels: np.ndarray, names: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """``[N]`` the index into ``classes`` of each row's one positive class; −1 for a row with
    none or several positive among ``classes`` (left out of a single-label score)."""
    columns = [list(names).index(c) for c in classes]
    positive = np.nan_to_num(labels[:, columns], nan=0.0) > 0
    return np.where(positive.sum(axis=1) == 1, positive.argmax(axis=1), -1)


def multiclass_metrics(
    classes: np.ndarray,
    predicted: np.ndarray,
    names: Sequence[str],
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy and macro F1 of a single-label prediction, with bootstrap 95 % intervals.

    ``classes`` and ``predicted`` ``[N]`` hold class indices into ``names``. A class's F1 is
    2·TP / (2·TP + FP + FN), 0 where that is 0/0 (as scikit-learn's ``zero_division=0``); macro
    F1 is their mean over all ``names``. Resamples multiply images as in ``multilabel_auroc``.
    """
    y, p = np.asarray(classes), np.asarray(predicted)
    weights = np.ones((1, len(y)))
    if bootstrap > 0:
        weights = np.concatenate([weights, bootstrap_weights(len(y), bootstrap, seed)])
    correct = weights @ (y == p)
    accuracy = correct / weights.sum(axis=1)
    f1 = []
    for c in range(len(names)):
        tp = weights @ ((p == c) & (y == c))
        wrong = weights @ ((p == c) != (y == c))  # false positives and false negatives
        with np.errstate(invalid="ignore", divide="ignore"):
            f1.append(np.where(2 * tp + wrong > 0, 2 * tp / (2 * tp + wrong), 0.0))
    macro_f1 = np.mean(f1, axis=0)
    return {
        "accuracy": float(accuracy[0]),
        "accuracy_ci95": percentile_ci(accuracy[1:]) if bootstrap > 0 else [None, None],
        "macro_f1": float(macro_f1[0]),
        "macro_f1_ci95": percentile_ci(macro_f1[1:]) if bootstrap > 0 else [None, None],
        "per_class": {
            name: {"f1": float(f1[c][0]), "images": int((y == c).sum())}
            for c, name in enumerate(names)
        },
        "images": int(len(y)),
        "bootstrap": bootstrap,
    }
