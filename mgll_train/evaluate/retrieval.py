"""Label-aware retrieval over the split's category texts, one text per image.

Duplicates are kept, as in CLIP's retrieval protocol. A hit at k: one of the top-k items has
exactly the query's set of positive labels. Chance level per query with n items of its label set
among N is `1 − C(N−n, k)/C(N, k)`, averaged over the queries. Graded mAP: relevance is the
Jaccard overlap of the positive label sets (two empty sets: 1),
AP = Σ_k rel_k·(Σ_{j≤k} rel_j / k) / Σ rel, which is ordinary AP for 0/1 relevance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..loss import label_cooccurrence

RECALL_KS = (1, 5, 10)


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
