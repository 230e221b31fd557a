"""The CLIP baseline: the symmetric contrastive loss with 1:1 targets, per granularity.

The mean over granularities of the standard symmetric CLIP loss; equal to open_clip's
``ClipLoss`` per granularity (global batch, ``local_loss`` and ``gather_with_grad`` as there).
``pointwise`` and ``kl`` are zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MultiGranularLoss
from .common import LossInputs, loss_terms

__all__ = ["ClipLoss"]


class ClipLoss(MultiGranularLoss):
    """Symmetric InfoNCE on every granularity, averaged (``--loss clip``)."""

    name = "clip"

    def compute(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        """``½[CE(L_g, I) + CE(L_gᵀ, I)]``, the mean over granularities and this rank's rows."""
        batch = self.global_logits(inputs, with_targets=False)
        rows, g = batch.rows, inputs.granularities
        target = torch.arange(rows.start, rows.stop, device=inputs.device)
        target = target.expand(g, rows.stop - rows.start)
        # cross_entropy over [G, classes=N, R]: the mean over G and the local rows.
        ce_i = F.cross_entropy(batch.i2t.transpose(1, 2), target)
        ce_t = F.cross_entropy(batch.t2i.transpose(1, 2), target)
        soft = 0.5 * (ce_i + ce_t)
        zero = batch.i2t.new_zeros(())
        return loss_terms(soft, soft, zero, zero)
