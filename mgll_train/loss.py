"""The MGLL objective as a plug-and-play PyTorch module (DESIGN §7).

Usage (the public API; the learnable scale and point-wise bias live on the model)::

    from mgll_train.loss import MGLLLoss
    loss_fn = MGLLLoss(soft_target="jaccard", weights=(1.0, 1.0, 1.0), rank=0, world_size=1,
                       gather_with_grad=True, local_loss=False)
    out = loss_fn(image_features,      # [B, D] (normalised unless the mode says otherwise)
                  text_features,       # [G, B, D]
                  logit_scale,         # scalar tensor, already exp'd
                  logit_bias=bias,     # scalar tensor for the point-wise term
                  labels=labels,       # [B, K] float, 1/0/-1/NaN
                  text_ids=text_ids)   # [G, B] int64 (optional)
    out["loss"], out["soft_contrastive"], out["pointwise"], out["kl"]

Modes (``mode=``):

``"mgll"`` (default, the paper's objective made numerically safe and distributed-correct)
    With the global batch of N images, G granularities and ``L_g = s * v @ u_gᵀ`` (rows images,
    columns texts), co-occurrence matrices ``C_g`` (N×N, diagonal 1):

    * granularity 0 (the category granularity) from the label vectors, ``soft_target=``
      ``"jaccard"`` (|P_i ∩ P_j| / |P_i ∪ P_j| over positive labels, counted only over labels
      annotated — not NaN — in both rows; two empty positive sets count as identical, 1),
      ``"overlap"`` (1 where the Jaccard value is > 0: a shared positive label, or two empty
      positive sets) or ``"exact"`` (1 where the granularity-0 ``text_ids`` agree);
    * granularities 1.. from text identity (``text_ids``), 1 where the texts are identical.

    A pair of rows with *no* label annotated in both (e.g. an all-NaN row against anything)
    carries no evidence and gets 0 (not 1); the diagonal is always 1. A label counts as positive
    when its value is > 0; ``-1`` (uncertain, should the loader keep it) is annotated but not
    positive; NaN is "not annotated". The label policy (``--uncertain``/``--unmentioned``) is
    applied by the data loader, not here.

    Terms, summed over granularities: soft contrastive ``½[CE(L_g, W_g) + CE(L_gᵀ, W'_g)]`` with
    ``W_g = rownorm(C_g)`` and ``W'_g = rownorm(C_gᵀ)`` (probability-target cross-entropy, mean
    over rows); point-wise ``mean over pairs of BCEWithLogits(L_g + b, Y_g)`` with
    ``Y_g = [C_g > 0]`` (``pointwise_target="binary"``) or ``C_g`` (``"graded"``); and the
    smooth KL (a generalised Jensen–Shannon divergence, in log space)
    ``Σ_g KL(P_g ‖ M)`` with ``log P_g = log_softmax(L_g)`` per image row and
    ``log M = logsumexp_g(log P_g) - log G`` (0 when G = 1).
    ``loss = α1 Σ_g soft + α2 Σ_g point-wise + α3 KL``, ``weights=(α1, α2, α3)``.

``"clip"``
    The mean over granularities of the standard symmetric CLIP loss (1:1 targets); equal to
    open_clip's ``ClipLoss`` per granularity. ``pointwise`` and ``kl`` are zero.

``"mgll-official"``
    The released reference code's arithmetic (``MultiGranularModule``): the caller passes the
    **projected, unnormalised** features (``model.visual(x)``, ``model.text(t)``) and the scale
    ``exp(s)`` with ``s`` clamped to ``[0, ln 100]`` (scale in [1, 100]); nothing is normalised
    or clamped here. Targets are exact text equality (``text_ids``, every granularity, whatever
    ``soft_target`` says), row-normalised, within the **local** batch only (no gather; one warning
    when ``world_size > 1``). Per granularity ``BCEWithLogits(L, Y)`` (the soft Y as target) plus
    ``¼ (CE(L, Y) + CE(Lᵀ, Y))``, summed over granularities, plus
    ``0.5 · mean_g kl_div(L_g.log(), M, "batchmean")`` on the raw logits with ``M = mean_g L_g``,
    added only when finite (a host sync, as in the reference). The components are returned as
    ``soft_contrastive`` (the ¼-weighted CE sum), ``pointwise`` (the BCE sum) and ``kl`` (0.5 ×
    the KL, or 0 when skipped); ``weights`` multiply them, and the default ``(1, 1, 1)``
    reproduces the reference exactly. ``logit_bias`` and ``labels`` are ignored.

Numerics: features are cast to ``promote_types(dtype, float32)`` (float32 for bf16/fp16 input,
float64 stays float64) and logits and losses are computed in that precision with autocast
disabled, so the loss is finite for any valid input, including scale 100 with bf16 features.

Distributed (``world_size > 1``, equal per-rank batches): ``"mgll"`` and ``"clip"`` gather image
and text features, labels and text ids from every rank (:func:`mgll_train.distributed.
gather_features`). With ``gather_with_grad=True`` the loss on each rank equals the
single-process loss on the concatenated batch, and each rank's feature gradient is
``world_size ×`` the single-process gradient of its slice, so after DDP's averaging the
parameter gradients equal the single-process ones. With ``gather_with_grad=False`` (open_clip's
default) the loss is the same, and each rank's local slice receives the gradient of that rank's
own loss with the other ranks' features held constant (for the full loss that is exactly the
single-process gradient of the slice, so DDP's averaging gives ``1/world_size`` of the
single-process encoder gradients; the scale and bias gradients are exact). ``local_loss=True``
computes only this rank's rows (its images against all texts, its texts against all images;
point-wise and KL over its image rows), each term a mean over the local rows, which is the local
sum normalised by the global size ``N`` times ``world_size``: the mean over ranks of the per-rank
losses is the global loss.

Text identity is carried as ``text_ids`` ([G, B] int64), :func:`text_hash` of the exact text
string computed in the data workers (:func:`text_ids_for`), so ids agree across ranks and
workers. Without ``text_ids`` the exact targets fall back to the identity matrix (one warning).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mgll_train.distributed import gather_features

__all__ = [
    "MGLLLoss",
    "label_cooccurrence",
    "text_cooccurrence",
    "text_hash",
    "text_ids_for",
]

LossMode = Literal["mgll", "clip", "mgll-official"]
SoftTarget = Literal["jaccard", "overlap", "exact"]
PointwiseTarget = Literal["binary", "graded"]

_MODES = ("mgll", "clip", "mgll-official")
_SOFT_TARGETS = ("jaccard", "overlap", "exact")
_POINTWISE_TARGETS = ("binary", "graded")
_MASK_63 = (1 << 63) - 1


def text_hash(text: str) -> int:
    """A stable 63-bit non-negative id of a text string.

    The first 8 bytes of ``blake2b(text.encode("utf-8"), digest_size=8)`` read little-endian and
    masked to 63 bits, so it fits a non-negative int64 and is identical in every process, worker
    and Python version (never Python's salted ``hash()``).
    """
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK_63


def text_ids_for(texts: Sequence[Sequence[str]]) -> torch.Tensor:
    """``[G, B]`` int64 text ids for ``texts[g][b]`` (granularity-major, as ``text_features``)."""
    rows = [[text_hash(t) for t in granularity] for granularity in texts]
    if rows and len({len(r) for r in rows}) != 1:
        raise ValueError("every granularity must have the same number of texts")
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), -1)


def label_cooccurrence(
    labels_rows: torch.Tensor,
    labels_cols: torch.Tensor,
    soft_target: Literal["jaccard", "overlap"] = "jaccard",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Label co-occurrence ``C[i, j]`` between label vectors ``[R, K]`` and ``[N, K]``.

    Counted only over the labels annotated (not NaN) in both rows; a label is positive when its
    value is > 0. ``"jaccard"``: ``|P_i ∩ P_j| / |P_i ∪ P_j|``, two empty positive sets → 1;
    ``"overlap"``: 1 where the Jaccard value is > 0. A pair with no commonly annotated label → 0.
    The diagonal is *not* forced here (the loss sets it to 1). The result is symmetric when the
    two arguments are the same rows.
    """
    if soft_target not in ("jaccard", "overlap"):
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


def _set_diagonal_one(c: torch.Tensor, offset: int) -> torch.Tensor:
    """Set ``c[..., i, i + offset] = 1`` (row i of this rank is column ``offset + i``)."""
    rows = c.shape[-2]
    idx = torch.arange(rows, device=c.device)
    c = c.clone()
    c[..., idx, idx + offset] = 1.0
    return c


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class MGLLLoss(nn.Module):
    """The MGLL loss (``mode="mgll"``), the CLIP baseline (``"clip"``) or the reference code's
    arithmetic (``"mgll-official"``); see the module docstring for the formulas.

    Args:
        mode: ``"mgll"``, ``"clip"`` or ``"mgll-official"``.
        soft_target: granularity-0 targets in ``"mgll"`` mode: ``"jaccard"``, ``"overlap"``
            (from ``labels``) or ``"exact"`` (from ``text_ids[0]``).
        weights: ``(α1, α2, α3)`` for the soft contrastive, point-wise and KL terms.
        pointwise_target: ``"binary"`` (``Y = [C > 0]``) or ``"graded"`` (``Y = C``).
        rank: this process's rank.
        world_size: number of processes; > 1 gathers the global batch (not in official mode).
        gather_with_grad: gather features with an autograd-aware all_gather.
        local_loss: compute only this rank's rows (mean over ranks = global loss).
    """

    def __init__(
        self,
        mode: LossMode = "mgll",
        soft_target: SoftTarget = "jaccard",
        weights: Sequence[float] = (1.0, 1.0, 1.0),
        pointwise_target: PointwiseTarget = "binary",
        rank: int = 0,
        world_size: int = 1,
        gather_with_grad: bool = False,
        local_loss: bool = False,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, not {mode!r}")
        if soft_target not in _SOFT_TARGETS:
            raise ValueError(f"soft_target must be one of {_SOFT_TARGETS}, not {soft_target!r}")
        if pointwise_target not in _POINTWISE_TARGETS:
            raise ValueError(
                f"pointwise_target must be one of {_POINTWISE_TARGETS}, not {pointwise_target!r}"
            )
        weights = tuple(float(w) for w in weights)
        if len(weights) != 3 or not all(math.isfinite(w) for w in weights):
            raise ValueError(f"weights must be three finite numbers, not {weights!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank/world_size {rank}/{world_size}")
        self.mode = mode
        self.soft_target = soft_target
        self.weights = weights
        self.pointwise_target = pointwise_target
        self.rank = rank
        self.world_size = world_size
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss
        self._warned: set[str] = set()

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, soft_target={self.soft_target!r}, weights={self.weights}, "
            f"pointwise_target={self.pointwise_target!r}, rank={self.rank}, "
            f"world_size={self.world_size}, gather_with_grad={self.gather_with_grad}, "
            f"local_loss={self.local_loss}"
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
        labels: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Compute the loss on this rank's batch (gathered when ``world_size > 1``).

        Args:
            image_features: ``[B, D]`` (L2-normalised, except in ``"mgll-official"``).
            text_features: ``[G, B, D]`` (a ``[B, D]`` tensor is taken as G = 1).
            logit_scale: scalar, already exponentiated.
            logit_bias: scalar point-wise bias (required by ``"mgll"`` when α2 ≠ 0).
            labels: ``[B, K]`` float label vectors, 1/0/-1/NaN (``"mgll"`` with
                ``jaccard``/``overlap``).
            text_ids: ``[G, B]`` int64 text ids (a ``[B]`` tensor is taken as G = 1).

        Returns:
            ``{"loss", "soft_contrastive", "pointwise", "kl"}``: 0-dim tensors in the compute
            precision; terms a mode does not use are zeros.
        """
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

        dtype = torch.promote_types(image_features.dtype, torch.float32)
        device = image_features.device
        # On the features' device before any gather (NCCL gathers device tensors only).
        if labels is not None:
            labels = labels.to(device)
        if text_ids is not None:
            text_ids = text_ids.to(device)
        logit_scale = torch.as_tensor(logit_scale, device=device)
        if logit_bias is not None:
            logit_bias = torch.as_tensor(logit_bias, device=device)
        with _no_autocast(device):
            if self.mode == "mgll-official":
                return self._official(image_features, text_features, logit_scale, text_ids, dtype)
            return self._global(
                image_features, text_features, logit_scale, logit_bias, labels, text_ids, dtype
            )

    # ------------------------------------------------------------------ helpers

    def _targets(
        self,
        granularities: int,
        labels: torch.Tensor | None,
        text_ids: torch.Tensor | None,
        rows: slice,
        n: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Co-occurrence ``C`` for the given rows against all N columns: ``[G, R, N]``."""
        r = rows.stop - rows.start
        out = []
        for gi in range(granularities):
            if gi == 0 and self.soft_target in ("jaccard", "overlap") and self.mode == "mgll":
                if labels is not None:
                    lab = labels.to(dtype)
                    out.append(label_cooccurrence(lab[rows], lab, self.soft_target, dtype))
                    continue
                self._warn_once(
                    "labels",
                    f"MGLLLoss: soft_target={self.soft_target!r} without labels; the category "
                    "granularity falls back to exact text identity",
                )
            if text_ids is None:
                self._warn_once(
                    "text_ids",
                    "MGLLLoss: text_ids not given; exact-text targets fall back to the identity "
                    "matrix (identical texts in the batch are treated as negatives)",
                )
                out.append(torch.zeros(r, n, device=device, dtype=dtype))
            else:
                ids = text_ids[gi].to(device)
                out.append(text_cooccurrence(ids[rows], ids, dtype))
        return _set_diagonal_one(torch.stack(out), rows.start)

    def _global(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None,
        labels: torch.Tensor | None,
        text_ids: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> dict[str, torch.Tensor]:
        """``"mgll"`` and ``"clip"`` on the global batch (gathered when distributed)."""
        a1, a2, a3 = self.weights
        if self.mode == "mgll" and logit_bias is None and a2 != 0:
            raise ValueError(
                "MGLLLoss(mode='mgll') needs logit_bias for the point-wise term "
                "(or weights with α2 = 0)"
            )
        b, g = image_features.shape[0], text_features.shape[0]
        device = image_features.device
        if self.world_size > 1:
            all_img, all_txt, all_labels, all_ids = gather_features(
                image_features,
                text_features,
                labels if self.mode == "mgll" else None,
                text_ids if self.mode == "mgll" else None,
                self.rank,
                self.world_size,
                self.gather_with_grad,
                self.local_loss,
            )
        else:
            all_img, all_txt, all_labels, all_ids = (
                image_features,
                text_features,
                labels,
                text_ids,
            )
        all_img = all_img.to(dtype)
        all_txt = all_txt.to(dtype)
        n = all_img.shape[0]
        scale = logit_scale.to(dtype)
        local = self.local_loss and self.world_size > 1
        if local:
            offset = self.rank * b
            rows = slice(offset, offset + b)
            # [G, R, N]: this rank's images against all texts / its texts against all images.
            logits_i2t = scale * (image_features.to(dtype) @ all_txt.transpose(1, 2))
            logits_t2i = scale * (text_features.to(dtype) @ all_img.T)
        else:
            rows = slice(0, n)
            logits_i2t = scale * (all_img @ all_txt.transpose(1, 2))
            logits_t2i = logits_i2t.transpose(1, 2)
        r = rows.stop - rows.start
        zero = logits_i2t.new_zeros(())

        if self.mode == "clip":
            target = torch.arange(rows.start, rows.stop, device=device).expand(g, r)
            # cross_entropy over [G, classes=N, R]: the mean over G and the local rows.
            ce_i = F.cross_entropy(logits_i2t.transpose(1, 2), target)
            ce_t = F.cross_entropy(logits_t2i.transpose(1, 2), target)
            soft = 0.5 * (ce_i + ce_t)
            return {"loss": soft, "soft_contrastive": soft, "pointwise": zero, "kl": zero}

        c = self._targets(g, all_labels, all_ids, rows, n, device, dtype)
        # C is symmetric, so the rows of Cᵀ for this rank's texts are the rows of C for its
        # images: W' = rownorm(Cᵀ)[rows] = rownorm(C)[rows] = W.
        w = c / c.sum(-1, keepdim=True)
        ce_i = -(w * logits_i2t.log_softmax(-1)).sum(-1).mean(-1)
        ce_t = -(w * logits_t2i.log_softmax(-1)).sum(-1).mean(-1)
        soft = (0.5 * (ce_i + ce_t)).sum()

        if logit_bias is not None:
            y = c if self.pointwise_target == "graded" else (c > 0).to(dtype)
            bce = F.binary_cross_entropy_with_logits(
                logits_i2t + logit_bias.to(dtype), y, reduction="none"
            )
            pointwise = bce.mean((1, 2)).sum()
        else:
            pointwise = zero

        if g > 1:
            log_p = logits_i2t.log_softmax(-1)  # [G, R, N]
            log_m = torch.logsumexp(log_p, dim=0) - math.log(g)
            kl = sum(
                (
                    F.kl_div(log_m, log_p[gi], reduction="batchmean", log_target=True)
                    for gi in range(g)
                ),
                start=zero,
            )
        else:
            kl = zero

        loss = a1 * soft + a2 * pointwise + a3 * kl
        return {"loss": loss, "soft_contrastive": soft, "pointwise": pointwise, "kl": kl}

    def _official(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        text_ids: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> dict[str, torch.Tensor]:
        """``"mgll-official"``: the reference code's arithmetic on the local batch."""
        if self.world_size > 1:
            self._warn_once(
                "official-ddp",
                "MGLLLoss(mode='mgll-official') uses the local batch only (no gather), as the "
                "reference code does; targets and loss ignore the other ranks",
            )
        a1, a2, a3 = self.weights
        g, b = text_features.shape[:2]
        device = image_features.device
        v = image_features.to(dtype)
        u = text_features.to(dtype)
        logits = logit_scale.to(dtype) * (v @ u.transpose(1, 2))  # [G, B, B], rows images
        if text_ids is None:
            self._warn_once(
                "text_ids",
                "MGLLLoss: text_ids not given; exact-text targets fall back to the identity matrix",
            )
            c = torch.eye(b, device=device, dtype=dtype).expand(g, b, b)
        else:
            ids = text_ids.to(device)
            c = torch.stack([text_cooccurrence(ids[gi], ids[gi], dtype) for gi in range(g)])
        y = c / c.sum(-1, keepdim=True)
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean((1, 2))
        ce_i = -(y * logits.log_softmax(-1)).sum(-1).mean(-1)
        ce_t = -(y * logits.transpose(1, 2).log_softmax(-1)).sum(-1).mean(-1)
        soft = (0.25 * (ce_i + ce_t)).sum()
        pointwise = bce.sum()
        m = logits.mean(0)
        kl_raw = torch.stack(
            [F.kl_div(logits[gi].log(), m, reduction="batchmean") for gi in range(g)]
        ).mean()
        # As in the reference: added only when finite (any logit <= 0 makes it NaN/inf).
        kl = 0.5 * kl_raw if bool(torch.isfinite(kl_raw)) else logits.new_zeros(())
        loss = a1 * soft + a2 * pointwise + a3 * kl
        return {"loss": loss, "soft_contrastive": soft, "pointwise": pointwise, "kl": kl}
