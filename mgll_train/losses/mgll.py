"""The MGLL objective: soft multi-label contrast, a point-wise term and a smooth KL.

The paper's objective made numerically safe and distributed-correct. With the global batch of
N images, G granularities and ``L_g = s * v @ u_gᵀ`` (rows images, columns texts),
co-occurrence matrices ``C_g`` (N×N, diagonal 1):

* granularity 0 (the category granularity) from the label vectors, ``soft_target=``
  ``"jaccard"`` (|P_i ∩ P_j| / |P_i ∪ P_j| over positive labels, counted only over labels
  annotated — not NaN — in both rows; two empty positive sets count as identical, 1),
  ``"overlap"`` (1 where the Jaccard value is > 0: a shared positive label, or two empty
  positive sets) or ``"exact"`` (1 where the granularity-0 ``text_ids`` agree);
* granularities 1.. from text identity (``text_ids``), 1 where the texts are identical.

A pair of rows with *no* label annotated in both (e.g. an all-NaN row against anything) carries
no evidence and gets 0 (not 1); the diagonal is always 1. A label counts as positive when its
value is > 0; ``-1`` (uncertain, should the loader keep it) is annotated but not positive; NaN
is "not annotated". The label policy (``--uncertain``/``--unmentioned``) is applied by the data
loader, not here.

Terms, summed over granularities: soft contrastive ``½[CE(L_g, W_g) + CE(L_gᵀ, W'_g)]`` with
``W_g = rownorm(C_g)`` and ``W'_g = rownorm(C_gᵀ)`` (probability-target cross-entropy, mean over
rows); point-wise ``mean over pairs of BCEWithLogits(L_g + b, Y_g)`` with ``Y_g = [C_g > 0]``
(``pointwise_target="binary"``) or ``C_g`` (``"graded"``); and the smooth KL (a generalised
Jensen–Shannon divergence, in log space) ``Σ_g KL(P_g ‖ M)`` with
``log P_g = log_softmax(L_g)`` per image row and ``log M = logsumexp_g(log P_g) - log G``
(0 when G = 1). ``loss = α1 Σ_g soft + α2 Σ_g point-wise + α3 KL``, ``weights=(α1, α2, α3)``.

Without ``text_ids`` the exact targets fall back to the identity matrix (one warning).
"""

from __future__ import annotations

import argparse
import inspect
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from mgll_train.choices import PointwiseTarget, SoftTarget

from .base import MultiGranularLoss
from .clip import ClipLoss
from .common import (
    LossInputs,
    check_target_options,
    cooccurrence_targets,
    loss_terms,
)
from .official import OfficialMGLLLoss

__all__ = ["MGLLLoss", "smooth_kl", "soft_contrastive"]

LossMode = Literal["mgll", "clip", "mgll-official"]
# The objectives `MGLLLoss(mode=...)` still builds (it was one class with three modes).
_MODES = ("mgll", "clip", "mgll-official")


class MGLLLoss(MultiGranularLoss):
    """The MGLL loss (``--loss mgll``); see the module docstring for the formulas.

    ``mode`` keeps the constructor of the single class that used to hold three objectives:
    ``MGLLLoss(mode="clip", ...)`` returns a :class:`ClipLoss` and ``mode="mgll-official"`` an
    :class:`OfficialMGLLLoss`, built from the same arguments (all checked as before) and giving
    the same outputs. New code names the class it wants, or calls
    :func:`mgll_train.losses.create_loss`.

    Args:
        mode: ``"mgll"``, or ``"clip"``/``"mgll-official"`` for the other objectives.
        soft_target: granularity-0 targets: ``"jaccard"``, ``"overlap"`` (from ``labels``) or
            ``"exact"`` (from ``text_ids[0]``).
        weights: ``(α1, α2, α3)`` for the soft contrastive, point-wise and KL terms.
        pointwise_target: ``"binary"`` (``Y = [C > 0]``) or ``"graded"`` (``Y = C``).
        rank, world_size, gather_with_grad, local_loss: see :class:`MultiGranularLoss`.
    """

    name = "mgll"
    uses_logit_bias = True

    def __new__(cls, *args: Any, **kwargs: Any) -> MultiGranularLoss:
        if cls is MGLLLoss:
            # The arguments as __init__ takes them (defaults filled in, unknown ones refused).
            bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
            bound.apply_defaults()
            options = dict(bound.arguments)
            del options["self"]
            other = _objective_for_mode(**options)
            if other is not None:  # not an MGLLLoss, so Python skips __init__
                return other
        return super().__new__(cls)

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
        if mode != "mgll":
            raise ValueError(f"{type(self).__name__} has no mode {mode!r}")
        weights = check_target_options(soft_target, weights, pointwise_target)
        super().__init__(rank, world_size, gather_with_grad, local_loss)
        self.soft_target = soft_target
        self.weights = weights
        self.pointwise_target = pointwise_target

    @classmethod
    def from_args(cls, args: argparse.Namespace, rank: int, world_size: int) -> MGLLLoss:
        """``--soft-target``, ``--loss-weights``, ``--pointwise-target`` and the gather flags."""
        return cls(
            soft_target=args.soft_target,
            weights=args.loss_weights,
            pointwise_target=args.pointwise_target,
            **cls.distributed_options(args, rank, world_size),
        )

    def extra_repr(self) -> str:
        return (
            f"soft_target={self.soft_target!r}, weights={self.weights}, "
            f"pointwise_target={self.pointwise_target!r}, {super().extra_repr()}"
        )

    def compute(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        """The three terms on this rank's rows of the global batch, and their weighted sum."""
        a1, a2, a3 = self.weights
        if inputs.logit_bias is None and a2 != 0:
            raise ValueError(
                "MGLLLoss(mode='mgll') needs logit_bias for the point-wise term "
                "(or weights with α2 = 0)"
            )
        batch = self.global_logits(inputs)
        c = cooccurrence_targets(
            inputs.granularities,
            batch.labels,
            batch.text_ids,
            batch.rows,
            batch.n,
            self.soft_target,
            self.warn_once,
            inputs.device,
            inputs.dtype,
        )
        zero = batch.i2t.new_zeros(())
        soft = soft_contrastive(batch.i2t, batch.t2i, c)
        if inputs.logit_bias is not None:
            pointwise = self.pointwise(batch.i2t, inputs.logit_bias.to(inputs.dtype), c)
        else:
            pointwise = zero
        kl = smooth_kl(batch.i2t) if inputs.granularities > 1 else zero
        loss = a1 * soft + a2 * pointwise + a3 * kl
        return loss_terms(loss, soft, pointwise, kl)

    def pointwise(self, logits: torch.Tensor, bias: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``Σ_g mean over pairs of BCEWithLogits(L_g + b, Y_g)``, Y binary or graded."""
        y = c if self.pointwise_target == "graded" else (c > 0).to(c.dtype)
        bce = F.binary_cross_entropy_with_logits(logits + bias, y, reduction="none")
        return bce.mean((1, 2)).sum()


def _objective_for_mode(
    mode: str,
    soft_target: str,
    weights: Sequence[float],
    pointwise_target: str,
    **distributed: Any,
) -> MultiGranularLoss | None:
    """The objective ``MGLLLoss(mode=...)`` stands for, or ``None`` for the MGLL loss itself.

    Every argument is checked, as the single class did, even those the objective ignores.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, not {mode!r}")
    if mode == "mgll":
        return None
    weights = check_target_options(soft_target, weights, pointwise_target)
    if mode == "clip":
        return ClipLoss(**distributed)
    return OfficialMGLLLoss(weights=weights, **distributed)


def soft_contrastive(i2t: torch.Tensor, t2i: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``Σ_g ½[CE(L_g, W_g) + CE(L_gᵀ, W'_g)]`` with row-normalised co-occurrence targets.

    ``C`` is symmetric, so the rows of ``Cᵀ`` for this rank's texts are the rows of ``C`` for
    its images: ``W' = rownorm(Cᵀ)[rows] = rownorm(C)[rows] = W``.
    """
    w = c / c.sum(-1, keepdim=True)
    ce_i = -(w * i2t.log_softmax(-1)).sum(-1).mean(-1)
    ce_t = -(w * t2i.log_softmax(-1)).sum(-1).mean(-1)
    return (0.5 * (ce_i + ce_t)).sum()


def smooth_kl(i2t: torch.Tensor) -> torch.Tensor:
    """``Σ_g KL(P_g ‖ M)`` per image row (batch mean), ``M`` the mixture of the ``P_g``."""
    g = i2t.shape[0]
    log_p = i2t.log_softmax(-1)  # [G, R, N]
    log_m = torch.logsumexp(log_p, dim=0) - math.log(g)
    return sum(
        (F.kl_div(log_m, log_p[gi], reduction="batchmean", log_target=True) for gi in range(g)),
        start=i2t.new_zeros(()),
    )
