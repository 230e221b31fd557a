"""G2D (``--loss g2d``, ``--dense-loss g2d``): a global objective plus pseudo-segmentation.

The dense task of G2D on an open_clip ViT: the last block's [CLS] → patch attention (heads
averaged) on the patch grid, upsampled (nearest) to the input size and thresholded at each
image's own 85th percentile, is a binary pseudo-mask (no gradient); a light SETR-style decoder
(1×1 convolution, then per doubling a 3×3 convolution, BatchNorm, ReLU and a 2× upsampling,
then a 1×1 convolution to one logit) predicts it from the patch tokens. Its loss is
``(1 − Dice) + 0.2 · BCE-with-logits`` (Dice on the sigmoid, smoothed by 1), weighted by
``weight`` from optimizer step ``start_step`` on (before that its weight is 0).

``--loss g2d`` adds it to the CLIP loss on the report text (``--report-text``, by default
description and explanation joined); ``--loss X --dense-loss g2d`` adds it to any other
objective X on its usual texts. The dense term is per rank (each rank's own images); its mean
over ranks is the single-process value. Outputs: the global objective's terms, its ``loss``
plus the weighted dense term, and ``dense`` (unweighted).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mgll_train.tokens import TokenBatch

from .base import MultiGranularLoss
from .clip import ClipLoss
from .common import LossInputs
from .tokenwise import DEFAULT_REPORT, TokenObjective

__all__ = ["G2DHeads", "G2DLoss", "SegmentationDecoder", "attention_pseudo_mask", "dice_bce"]


class SegmentationDecoder(nn.Module):
    """A light SETR-PUP decoder: patch tokens ``[B, P, W]`` → one logit per input pixel."""

    def __init__(self, width: int, patch_size: int, channels: int = 64) -> None:
        super().__init__()
        stages = max(1, round(math.log2(max(patch_size, 2))))
        layers: list[nn.Module] = [nn.Conv2d(width, channels, 1)]
        for _ in range(stages):
            layers += [
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            ]
        layers.append(nn.Conv2d(channels, 1, 1))
        self.layers = nn.Sequential(*layers)

    def forward(
        self, patches: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]
    ) -> torch.Tensor:
        """``[B, 1, H, W]`` logits for inputs of ``size`` from tokens on a ``grid``."""
        b, _, width = patches.shape
        x = patches.transpose(1, 2).reshape(b, width, *grid)
        logits = self.layers(x)
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


@torch.no_grad()
def attention_pseudo_mask(
    attention: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], quantile: float = 0.85
) -> torch.Tensor:
    """``[B, 1, H, W]``: 1 where the [CLS] → patch attention ``[B, P]``, upsampled (nearest)
    to ``size``, is above the image's own ``quantile``, else 0."""
    b = attention.shape[0]
    upsampled = F.interpolate(attention.view(b, 1, *grid).float(), size=size, mode="nearest")
    flat = upsampled.flatten(1)
    # torch.quantile takes at most 2**24 values per call: large batches go in chunks.
    rows = max(1, 2**24 // flat.shape[1])
    threshold = torch.cat([torch.quantile(c, quantile, dim=1) for c in flat.split(rows)])
    return (upsampled > threshold.view(b, 1, 1, 1)).to(attention.dtype)


def dice_bce(logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 0.2) -> torch.Tensor:
    """``mean over images of (1 − Dice(sigmoid(logits), target)) + bce_weight · BCE``."""
    p = logits.sigmoid()
    inter = (p * target).flatten(1).sum(1)
    dice = (2 * inter + 1) / (p.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return (1 - dice).mean() + bce_weight * bce


class G2DHeads(nn.Module):
    """The decoder and the pseudo-mask it is trained to predict."""

    def __init__(self, width: int, patch_size: int, quantile: float = 0.85) -> None:
        super().__init__()
        self.decoder = SegmentationDecoder(width, patch_size)
        self.quantile = quantile

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, tokens: TokenBatch
    ) -> dict[str, torch.Tensor]:
        """``mask_logits`` and ``mask_target``, both ``[B, 1, H, W]``."""
        image = tokens.image
        assert image is not None
        return {
            "mask_logits": self.decoder(image.patches, image.grid, tokens.image_size),
            "mask_target": attention_pseudo_mask(
                image.attention, image.grid, tokens.image_size, self.quantile
            ),
        }


class G2DLoss(TokenObjective):
    """A global objective plus G2D's pseudo-segmentation (see the module docstring).

    Args:
        global_objective: the objective on pooled features (default: CLIP on the report).
        weight: weight of the dense term once it is on.
        start_step: the first optimizer step (counted from 0) with the dense term on.
        bce_weight: weight of the BCE beside ``1 − Dice``.
        quantile: each image's attention quantile that makes the pseudo-mask.
        report: granularities joined into the report text (``()``: the usual texts).
        rank, world_size, gather_with_grad, local_loss: see :class:`MultiGranularLoss`.
    """

    name = "g2d"
    text_tokens = False

    def __init__(
        self,
        global_objective: MultiGranularLoss | None = None,
        weight: float = 1.0,
        start_step: int = 200,
        bce_weight: float = 0.2,
        quantile: float = 0.85,
        report: Sequence[str] = DEFAULT_REPORT,
        **distributed: Any,
    ) -> None:
        super().__init__(report, **distributed)
        if start_step < 0 or not 0 < quantile < 1 or not math.isfinite(weight):
            raise ValueError("G2D needs start_step >= 0, 0 < quantile < 1 and a finite weight")
        self.global_objective = global_objective or ClipLoss(**distributed)
        self.weight = weight
        self.start_step = start_step
        self.bce_weight = bce_weight
        self.quantile = quantile

    @classmethod
    def from_args(cls, args: argparse.Namespace, rank: int, world_size: int) -> G2DLoss:
        """``--loss g2d``: CLIP on ``--report-text`` plus the dense task (``--g2d-start-step``)."""
        return cls(
            start_step=args.g2d_start_step,
            report=cls.report_from_args(args),
            **cls.distributed_options(args, rank, world_size),
        )

    @classmethod
    def around(cls, objective: MultiGranularLoss, args: argparse.Namespace) -> G2DLoss:
        """``--dense-loss g2d``: ``objective`` on its usual texts plus the dense task."""
        return cls(
            global_objective=objective,
            start_step=args.g2d_start_step,
            report=(),
            rank=objective.rank,
            world_size=objective.world_size,
            gather_with_grad=objective.gather_with_grad,
            local_loss=objective.local_loss,
        )

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, start_step={self.start_step}, report={self.report}, "
            f"{super().extra_repr()}"
        )

    def make_heads(self, clip: nn.Module) -> G2DHeads:
        visual = clip.visual
        patch = visual.patch_size
        return G2DHeads(
            int(visual.transformer.width),
            int(patch[0] if isinstance(patch, tuple) else patch),
            self.quantile,
        )

    def compute_dense(
        self, inputs: LossInputs, dense: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The global objective's terms, its loss plus the weighted dense term, and ``dense``."""
        out = dict(self.global_objective.compute(inputs))
        term = dice_bce(dense["mask_logits"], dense["mask_target"], self.bce_weight)
        # Before start_step the decoder still runs (DDP needs its gradients) with weight 0.
        weight = self.weight if self.step >= self.start_step else 0.0
        out["loss"] = out["loss"] + weight * term
        out["dense"] = term.detach()
        return out
