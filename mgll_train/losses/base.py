"""The base class of every objective: one rank's batch in, a dict of loss terms out.

Distributed (``world_size > 1``, equal per-rank batches): objectives that use the global batch
gather image and text features (and the labels and text ids they need) from every rank with
:func:`~mgll_train.losses.common.global_logits`. With ``gather_with_grad=True`` the loss on each
rank equals the single-process loss on the concatenated batch, and each rank's feature gradient
is ``world_size ×`` the single-process gradient of its slice, so after DDP's averaging the
parameter gradients equal the single-process ones. With ``gather_with_grad=False`` (open_clip's
default) the loss is the same, and each rank's local slice receives the gradient of that rank's
own loss with the other ranks' features held constant (for the full loss that is exactly the
single-process gradient of the slice, so DDP's averaging gives ``1/world_size`` of the
single-process encoder gradients; the scale and bias gradients are exact). ``local_loss=True``
computes only this rank's rows (its images against all texts, its texts against all images;
row-wise terms over its image rows), each term a mean over the local rows, which is the local
sum normalised by the global size ``N`` times ``world_size``: the mean over ranks of the per-rank
losses is the global loss.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from .common import GlobalLogits, LossInputs, global_logits, no_autocast, prepare_inputs

__all__ = ["MultiGranularLoss"]


class MultiGranularLoss(nn.Module):
    """An image–text objective over G granularities of text (subclass it to add one).

    A subclass sets :attr:`name` (its ``--loss`` value) and the two model flags, and implements
    :meth:`compute`; :meth:`forward` checks the inputs, moves them to the features' device and
    calls :meth:`compute` with autocast off. A subclass with options of its own extends
    ``__init__`` and :meth:`from_args`.

    Args:
        rank: this process's rank.
        world_size: number of processes; > 1 gathers the global batch (where the objective
            uses one).
        gather_with_grad: gather features with an autograd-aware all_gather.
        local_loss: compute only this rank's rows (mean over ranks = global loss).
    """

    #: The ``--loss`` value that selects this objective.
    name: ClassVar[str]
    #: Whether the model should return L2-normalised features (``False``: projected, raw).
    normalized_features: ClassVar[bool] = True
    #: Whether the objective uses the model's learnable ``logit_bias`` (created at -10).
    uses_logit_bias: ClassVar[bool] = False

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        gather_with_grad: bool = False,
        local_loss: bool = False,
    ) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank/world_size {rank}/{world_size}")
        self.rank = rank
        self.world_size = world_size
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss
        self._warned: set[str] = set()

    @classmethod
    def from_args(cls, args: argparse.Namespace, rank: int, world_size: int) -> MultiGranularLoss:
        """The objective as the ``mgll-train fit`` flags configure it."""
        return cls(**cls.distributed_options(args, rank, world_size))

    @staticmethod
    def distributed_options(args: argparse.Namespace, rank: int, world_size: int) -> dict[str, Any]:
        """The constructor arguments every objective shares, from the fit flags."""
        return {
            "rank": rank,
            "world_size": world_size,
            "gather_with_grad": args.gather_with_grad,
            "local_loss": args.local_loss,
        }

    @property
    def mode(self) -> str:
        """The objective's name (the ``mode=`` of the single ``MGLLLoss`` this replaced)."""
        return self.name

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, world_size={self.world_size}, "
            f"gather_with_grad={self.gather_with_grad}, local_loss={self.local_loss}"
        )

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
            image_features: ``[B, D]`` (L2-normalised unless :attr:`normalized_features` is
                false).
            text_features: ``[G, B, D]`` (a ``[B, D]`` tensor is taken as G = 1).
            logit_scale: scalar, already exponentiated.
            logit_bias: scalar point-wise bias (objectives with :attr:`uses_logit_bias`).
            labels: ``[B, K]`` float label vectors, 1/0/-1/NaN.
            text_ids: ``[G, B]`` int64 text ids (a ``[B]`` tensor is taken as G = 1).

        Returns:
            ``{"loss", "soft_contrastive", "pointwise", "kl"}``: 0-dim tensors in the compute
            precision; terms an objective does not use are zeros.
        """
        inputs = prepare_inputs(
            image_features, text_features, logit_scale, logit_bias, labels, text_ids
        )
        with no_autocast(inputs.device):
            return self.compute(inputs)

    def compute(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        """The objective on checked inputs; return :func:`~.common.loss_terms`."""
        raise NotImplementedError

    def global_logits(self, inputs: LossInputs, with_targets: bool = True) -> GlobalLogits:
        """This rank's logits against the global batch, with this loss's distributed options."""
        return global_logits(
            inputs,
            self.rank,
            self.world_size,
            self.gather_with_grad,
            self.local_loss,
            with_targets=with_targets,
        )

    def warn_once(self, key: str, message: str) -> None:
        """Warn about ``key`` once per loss instance (not once per step)."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)
