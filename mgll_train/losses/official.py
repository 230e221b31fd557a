"""The released reference code's arithmetic (``MultiGranularModule``), for comparison runs.

The caller passes the **projected, unnormalised** features (``model.visual(x)``,
``model.text(t)``) and the scale ``exp(s)`` with ``s`` clamped to ``[0, ln 100]`` (scale in
[1, 100]); nothing is normalised or clamped here. Targets are exact text equality
(``text_ids``, every granularity), row-normalised, within the **local** batch only (no gather;
one warning when ``world_size > 1``). Per granularity ``BCEWithLogits(L, Y)`` (the soft Y as
target) plus ``¼ (CE(L, Y) + CE(Lᵀ, Y))``, summed over granularities, plus
``0.5 · mean_g kl_div(L_g.log(), M, "batchmean")`` on the raw logits with ``M = mean_g L_g``,
added only when finite (a host sync, as in the reference). The components are returned as
``soft_contrastive`` (the ¼-weighted CE sum), ``pointwise`` (the BCE sum) and ``kl`` (0.5 × the
KL, or 0 when skipped); ``weights`` multiply them, and the default ``(1, 1, 1)`` reproduces the
reference exactly. ``logit_bias`` and ``labels`` are ignored.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .base import MultiGranularLoss
from .common import LossInputs, check_weights, loss_terms, text_cooccurrence

__all__ = ["OfficialMGLLLoss"]


class OfficialMGLLLoss(MultiGranularLoss):
    """The reference code's MGLL arithmetic on the local batch (``--loss mgll-official``).

    Args:
        weights: ``(α1, α2, α3)`` for the soft contrastive, point-wise and KL terms.
        rank, world_size: see :class:`MultiGranularLoss`; nothing is gathered.
        gather_with_grad, local_loss: accepted for a uniform constructor; unused.
    """

    name = "mgll-official"
    normalized_features = False

    def __init__(
        self,
        weights: Sequence[float] = (1.0, 1.0, 1.0),
        rank: int = 0,
        world_size: int = 1,
        gather_with_grad: bool = False,
        local_loss: bool = False,
    ) -> None:
        weights = check_weights(weights)
        super().__init__(rank, world_size, gather_with_grad, local_loss)
        self.weights = weights

    @classmethod
    def from_args(cls, args: argparse.Namespace, rank: int, world_size: int) -> OfficialMGLLLoss:
        """``--loss-weights`` (the targets are always exact text identity)."""
        return cls(weights=args.loss_weights, **cls.distributed_options(args, rank, world_size))

    def extra_repr(self) -> str:
        return f"weights={self.weights}, {super().extra_repr()}"

    def compute(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        """The reference's terms on the local batch, weighted by ``weights``."""
        if self.world_size > 1:
            self.warn_once(
                "official-ddp",
                "MGLLLoss(mode='mgll-official') uses the local batch only (no gather), as the "
                "reference code does; targets and loss ignore the other ranks",
            )
        a1, a2, a3 = self.weights
        dtype = inputs.dtype
        v = inputs.image_features.to(dtype)
        u = inputs.text_features.to(dtype)
        logits = inputs.logit_scale.to(dtype) * (v @ u.transpose(1, 2))  # [G, B, B], rows images
        c = self._targets(inputs)
        y = c / c.sum(-1, keepdim=True)
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean((1, 2))
        ce_i = -(y * logits.log_softmax(-1)).sum(-1).mean(-1)
        ce_t = -(y * logits.transpose(1, 2).log_softmax(-1)).sum(-1).mean(-1)
        soft = (0.25 * (ce_i + ce_t)).sum()
        pointwise = bce.sum()
        g = inputs.granularities
        m = logits.mean(0)
        kl_raw = torch.stack(
            [F.kl_div(logits[gi].log(), m, reduction="batchmean") for gi in range(g)]
        ).mean()
        # As in the reference: added only when finite (any logit <= 0 makes it NaN/inf).
        kl = 0.5 * kl_raw if bool(torch.isfinite(kl_raw)) else logits.new_zeros(())
        loss = a1 * soft + a2 * pointwise + a3 * kl
        return loss_terms(loss, soft, pointwise, kl)

    def _targets(self, inputs: LossInputs) -> torch.Tensor:
        """``[G, B, B]`` exact text identity within the local batch (identity without ids)."""
        g, b = inputs.granularities, inputs.batch_size
        if inputs.text_ids is None:
            self.warn_once(
                "text_ids",
                "MGLLLoss: text_ids not given; exact-text targets fall back to the identity matrix",
            )
            return torch.eye(b, device=inputs.device, dtype=inputs.dtype).expand(g, b, b)
        ids = inputs.text_ids
        return torch.stack([text_cooccurrence(ids[gi], ids[gi], inputs.dtype) for gi in range(g)])
