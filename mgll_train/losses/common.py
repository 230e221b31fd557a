"""What every objective shares: options, text ids, co-occurrence, input checks, the global batch.

* **Text identity.** Texts are compared by ``text_ids`` (``[G, B]`` int64): :func:`text_hash`
  (from :mod:`mgll_data.record`) of the exact text string, computed in the data workers
  (:func:`text_ids_for`), so ids agree across ranks and workers.
* **Co-occurrence.** ``C[i, j]`` says how much image ``i`` and text ``j`` belong together:
  :func:`label_cooccurrence` from label vectors, :func:`text_cooccurrence` from text identity;
  :func:`cooccurrence_targets` stacks one matrix per granularity and sets the diagonal to 1.
* **Inputs.** :func:`prepare_inputs` checks the shapes of one rank's batch and puts everything
  on the features' device; the loss then runs under :func:`no_autocast` in ``inputs.dtype``
  (``promote_types(dtype, float32)``: float32 for bf16/fp16 features, float64 stays float64), so
  it is finite for any valid input, including scale 100 with bf16 features.
* **The global batch.** :func:`global_logits` gathers the other ranks' features (and optionally
  labels and text ids, :func:`mgll_train.distributed.gather_features`) and computes the scaled
  similarities of this rank's rows against the whole global batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from mgll_data.record import text_hash
from mgll_train.choices import POINTWISE_TARGETS, SOFT_TARGETS
from mgll_train.distributed import gather_features

__all__ = [
    "GlobalLogits",
    "LossInputs",
    "check_target_options",
    "check_weights",
    "cooccurrence_targets",
    "global_logits",
    "label_cooccurrence",
    "loss_terms",
    "no_autocast",
    "prepare_inputs",
    "set_diagonal_one",
    "text_cooccurrence",
    "text_hash",
    "text_ids_for",
]

LabelTarget = Literal["jaccard", "overlap"]
LABEL_TARGETS = ("jaccard", "overlap")
# warn(key, message): the loss's once-per-instance warning.
Warn = Callable[[str, str], None]

# ----------------------------------------------------------------------------- options


def check_weights(weights: Sequence[float]) -> tuple[float, float, float]:
    """``weights`` as three floats; raises unless they are three finite numbers."""
    out = tuple(float(w) for w in weights)
    if len(out) != 3 or not all(math.isfinite(w) for w in out):
        raise ValueError(f"weights must be three finite numbers, not {out!r}")
    return out  # type: ignore[return-value]


def check_target_options(
    soft_target: str, weights: Sequence[float], pointwise_target: str
) -> tuple[float, float, float]:
    """Check the target and weight options (``--soft-target``, ``--loss-weights``,
    ``--pointwise-target``); return the weights as three floats."""
    if soft_target not in SOFT_TARGETS:
        raise ValueError(f"soft_target must be one of {SOFT_TARGETS}, not {soft_target!r}")
    if pointwise_target not in POINTWISE_TARGETS:
        raise ValueError(
            f"pointwise_target must be one of {POINTWISE_TARGETS}, not {pointwise_target!r}"
        )
    return check_weights(weights)


# ----------------------------------------------------------------------------- text identity


def text_ids_for(texts: Sequence[Sequence[str]]) -> torch.Tensor:
    """``[G, B]`` int64 text ids for ``texts[g][b]`` (granularity-major, as ``text_features``)."""
    rows = [[text_hash(t) for t in granularity] for granularity in texts]
    if rows and len({len(r) for r in rows}) != 1:
        raise ValueError("every granularity must have the same number of texts")
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), -1)


# ----------------------------------------------------------------------------- co-occurrence


def label_cooccurrence(
    labels_rows: torch.Tensor,
    labels_cols: torch.Tensor,
    soft_target: LabelTarget = "jaccard",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Label co-occurrence ``C[i, j]`` between label vectors ``[R, K]`` and ``[N, K]``.

    Counted only over the labels annotated (not NaN) in both rows; a label is positive when its
    value is > 0. ``"jaccard"``: ``|P_i ∩ P_j| / |P_i ∪ P_j|``, two empty positive sets → 1;
    ``"overlap"``: 1 where the Jaccard value is > 0. A pair with no commonly annotated label → 0.
    The diagonal is *not* forced here (the loss sets it to 1). The result is symmetric when the
    two arguments are the same rows.
    """
    if soft_target not in LABEL_TARGETS:
        raise ValueError(
            f"label_cooccurrence: soft_target must be jaccard|overlap, not {soft_target}"
        )
    # Counts are small integers: exact in float32/float64 matmuls.
    pos_r = (labels_rows > 0).to(dtype)
    pos_c = (labels_cols > 0).to(dtype)
    ann_r = (~torch.isnan(labels_rows)).to(dtype)
    ann_c = (~torch.isnan(labels_cols)).to(dtype)
    inter = pos_r @ pos_c.T
    union = pos_r @ ann_c.T + ann_r @ pos_c.T - inter
    common = ann_r @ ann_c.T
    empty_both = torch.where(common > 0, 1.0, 0.0).to(dtype)
    jaccard = torch.where(union > 0, inter / union.clamp_min(1.0), empty_both)
    if soft_target == "overlap":
        return (jaccard > 0).to(dtype)
    return jaccard


def text_cooccurrence(
    ids_rows: torch.Tensor, ids_cols: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``C[i, j] = 1`` where text ids ``[R]`` and ``[N]`` are equal, else 0."""
    return (ids_rows[:, None] == ids_cols[None, :]).to(dtype)


def set_diagonal_one(c: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of ``c`` with ``c[..., i, i + offset] = 1`` (row i of this rank is column
    ``offset + i`` of the global batch)."""
    rows = c.shape[-2]
    idx = torch.arange(rows, device=c.device)
    c = c.clone()
    c[..., idx, idx + offset] = 1.0
    return c


def cooccurrence_targets(
    granularities: int,
    labels: torch.Tensor | None,
    text_ids: torch.Tensor | None,
    rows: slice,
    n: int,
    category_target: str,
    warn: Warn,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Co-occurrence ``C`` of the given rows against all ``n`` columns: ``[G, R, N]``.

    Granularity 0 comes from ``labels`` when ``category_target`` is ``"jaccard"`` or
    ``"overlap"``, every other granularity (and granularity 0 with ``"exact"``) from text
    identity. What is missing falls back, with one warning: no labels → exact text identity, no
    text ids → the identity matrix. The diagonal is 1.
    """
    r = rows.stop - rows.start
    out = []
    for gi in range(granularities):
        if gi == 0 and category_target in LABEL_TARGETS:
            if labels is not None:
                lab = labels.to(dtype)
                out.append(label_cooccurrence(lab[rows], lab, category_target, dtype))
                continue
            warn(
                "labels",
                f"MGLLLoss: soft_target={category_target!r} without labels; the category "
                "granularity falls back to exact text identity",
            )
        if text_ids is None:
            warn(
                "text_ids",
                "MGLLLoss: text_ids not given; exact-text targets fall back to the identity "
                "matrix (identical texts in the batch are treated as negatives)",
            )
            out.append(torch.zeros(r, n, device=device, dtype=dtype))
        else:
            ids = text_ids[gi].to(device)
            out.append(text_cooccurrence(ids[rows], ids, dtype))
    return set_diagonal_one(torch.stack(out), rows.start)


# ----------------------------------------------------------------------------- inputs


@dataclass
class LossInputs:
    """One rank's batch, checked and on the features' device (see :func:`prepare_inputs`)."""

    image_features: torch.Tensor  # [B, D]
    text_features: torch.Tensor  # [G, B, D]
    logit_scale: torch.Tensor  # 0-dim, already exponentiated
    logit_bias: torch.Tensor | None  # 0-dim
    labels: torch.Tensor | None  # [B, K] float, 1/0/-1/NaN
    text_ids: torch.Tensor | None  # [G, B] int64
    dtype: torch.dtype  # the precision the loss is computed in

    @property
    def granularities(self) -> int:
        return self.text_features.shape[0]

    @property
    def batch_size(self) -> int:
        return self.image_features.shape[0]

    @property
    def device(self) -> torch.device:
        return self.image_features.device


def prepare_inputs(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None,
    labels: torch.Tensor | None,
    text_ids: torch.Tensor | None,
) -> LossInputs:
    """Check the shapes (a ``[B, D]`` text tensor and ``[B]`` ids are taken as G = 1) and move
    labels, ids, scale and bias to the features' device (NCCL gathers device tensors only)."""
    if text_features.dim() == 2:
        text_features = text_features.unsqueeze(0)
    if text_ids is not None and text_ids.dim() == 1:
        text_ids = text_ids.unsqueeze(0)
    if image_features.dim() != 2 or text_features.dim() != 3:
        raise ValueError(
            "image_features must be [B, D] and text_features [G, B, D]; got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    g, b, d = text_features.shape
    if image_features.shape != (b, d):
        raise ValueError(
            f"image_features {tuple(image_features.shape)} do not match text_features "
            f"{tuple(text_features.shape)} (expected [{b}, {d}])"
        )
    if labels is not None and (labels.dim() != 2 or labels.shape[0] != b):
        raise ValueError(f"labels must be [B={b}, K], got {tuple(labels.shape)}")
    if text_ids is not None and tuple(text_ids.shape) != (g, b):
        raise ValueError(f"text_ids must be [G={g}, B={b}], got {tuple(text_ids.shape)}")
    if text_ids is not None and text_ids.dtype.is_floating_point:
        raise ValueError("text_ids must be an integer tensor (int64 hashes)")
    device = image_features.device
    return LossInputs(
        image_features=image_features,
        text_features=text_features,
        logit_scale=torch.as_tensor(logit_scale, device=device),
        logit_bias=None if logit_bias is None else torch.as_tensor(logit_bias, device=device),
        labels=None if labels is None else labels.to(device),
        text_ids=None if text_ids is None else text_ids.to(device),
        dtype=torch.promote_types(image_features.dtype, torch.float32),
    )


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Autocast switched off on ``device`` (the loss picks its own precision)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def loss_terms(
    loss: torch.Tensor,
    soft_contrastive: torch.Tensor,
    pointwise: torch.Tensor,
    kl: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The output every objective returns (the training loop logs these four)."""
    return {"loss": loss, "soft_contrastive": soft_contrastive, "pointwise": pointwise, "kl": kl}


# ----------------------------------------------------------------------------- global batch


@dataclass
class GlobalLogits:
    """This rank's rows of the global batch and their scaled similarities.

    ``rows`` are this rank's rows as indices of the global batch of ``n``: all of them, or with
    a local loss only this rank's slice. ``i2t[g]`` holds those images against all ``n`` texts
    of granularity g, ``t2i[g]`` those texts against all ``n`` images (``[G, R, N]`` each).
    """

    i2t: torch.Tensor
    t2i: torch.Tensor
    rows: slice
    n: int
    labels: torch.Tensor | None  # [N, K], gathered when asked for
    text_ids: torch.Tensor | None  # [G, N], gathered when asked for


def global_logits(
    inputs: LossInputs,
    rank: int,
    world_size: int,
    gather_with_grad: bool,
    local_loss: bool,
    with_targets: bool = True,
) -> GlobalLogits:
    """Gather the global batch (``world_size > 1``) and compute this rank's logits.

    ``with_targets=False`` gathers no labels or text ids (an objective with 1:1 targets).
    """
    labels = inputs.labels if with_targets else None
    text_ids = inputs.text_ids if with_targets else None
    if world_size > 1:
        all_img, all_txt, all_labels, all_ids = gather_features(
            inputs.image_features,
            inputs.text_features,
            labels,
            text_ids,
            rank,
            world_size,
            gather_with_grad,
            local_loss,
        )
    else:
        all_img, all_txt = inputs.image_features, inputs.text_features
        all_labels, all_ids = labels, text_ids
    dtype = inputs.dtype
    all_img = all_img.to(dtype)
    all_txt = all_txt.to(dtype)
    n = all_img.shape[0]
    scale = inputs.logit_scale.to(dtype)
    if local_loss and world_size > 1:
        offset = rank * inputs.batch_size
        rows = slice(offset, offset + inputs.batch_size)
        i2t = scale * (inputs.image_features.to(dtype) @ all_txt.transpose(1, 2))
        t2i = scale * (inputs.text_features.to(dtype) @ all_img.T)
    else:
        rows = slice(0, n)
        i2t = scale * (all_img @ all_txt.transpose(1, 2))
        t2i = i2t.transpose(1, 2)
    return GlobalLogits(i2t=i2t, t2i=t2i, rows=rows, n=n, labels=all_labels, text_ids=all_ids)
