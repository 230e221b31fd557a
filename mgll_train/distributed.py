"""Gathering a batch from every rank for the MGLL loss (``torch.distributed``).

The loss needs the *global* batch: image and text features, label vectors and text ids from
every rank. :func:`gather_features` does that in the manner of open_clip's ``gather_features``,
with two rules that every caller must respect:

* per-rank batches are equal (use ``drop_last``); ``all_gather`` needs equal shapes, and the
  rank ``r`` slice of the global batch is rows ``r * B .. (r + 1) * B - 1``;
* every rank calls it (it is a collective), and with ``gather_with_grad`` every rank also runs
  the backward pass (the backward of the autograd-aware gather is a collective too).

Gradients:

* ``gather_with_grad=True``: an autograd-aware all_gather (:class:`_AllGatherWithGrad`, the
  semantics of ``torch.distributed.nn.functional.all_gather``, which torch 2.14 deprecates in
  favour of a private module), whose backward sums, over ranks, the gradients that every rank's
  loss sends to slice ``r``, and hands the sum to rank ``r``. If every rank computes the same
  global loss ``L``, rank ``r`` thus receives ``world_size * dL/dx_r``; DDP's averaging (sum
  over ranks / ``world_size``) of the encoder gradients then gives exactly the single-process
  gradient.
* ``gather_with_grad=False``: a plain ``all_gather`` (no autograd) after which this rank's slice
  is replaced by the local tensors, so the local slice keeps its graph: rank ``r`` receives the
  gradient of *its own* loss w.r.t. its local features, all other ranks' features being held
  constant. Unlike open_clip, the slice is replaced with ``local_loss=True`` as well (open_clip
  leaves it detached there); with a local loss the own texts also appear as columns of the own
  image rows, and keeping them attached makes rank ``r``'s gradient exactly ``dL_r/dx_r``.

Labels and text ids carry no gradient and are gathered with a plain ``all_gather``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["gather_features"]


class _AllGatherWithGrad(torch.autograd.Function):
    """All ranks' parts of ``tensor`` as a list; backward sums each part's gradient over ranks."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_all_gather_plain(tensor))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> torch.Tensor:
        # One all_reduce on every backend (gloo has no reduce_scatter; the features' gradients
        # are small, so the W-fold traffic is cheap and one code path is tested on CPU).
        stacked = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def _all_gather_plain(tensor: torch.Tensor) -> list[torch.Tensor]:
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return parts


def _gather(
    tensor: torch.Tensor, rank: int, dim: int, with_grad: bool, keep_local: bool
) -> torch.Tensor:
    if with_grad:
        return torch.cat(_AllGatherWithGrad.apply(tensor.contiguous()), dim=dim)
    parts = _all_gather_plain(tensor)
    if keep_local:
        parts[rank] = tensor
    return torch.cat(parts, dim=dim)


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor | None,
    text_ids: torch.Tensor | None,
    rank: int,
    world_size: int,
    gather_with_grad: bool = False,
    local_loss: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gather the global batch from all ranks (equal per-rank batch size ``B``).

    Args:
        image_features: ``[B, D]`` local image features.
        text_features: ``[G, B, D]`` local text features, one row block per granularity.
        labels: ``[B, K]`` local label vectors (float, NaN allowed) or ``None``.
        text_ids: ``[G, B]`` int64 text ids or ``None``.
        rank: this process's rank.
        world_size: number of processes.
        gather_with_grad: gather features with the autograd-aware ``all_gather``.
        local_loss: accepted for parity with open_clip's signature; it does not change the
            result (the local slice is kept attached in both cases, see the module docstring).

    Returns:
        ``(all_image [N, D], all_text [G, N, D], all_labels [N, K] | None,
        all_text_ids [G, N] | None)`` with ``N = world_size * B``, in rank order.
    """
    del local_loss  # same gathering either way; kept for open_clip parity
    if world_size == 1:
        return image_features, text_features, labels, text_ids
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("gather_features needs an initialised torch.distributed process group")
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(
            f"rank/world_size ({rank}/{world_size}) disagree with the process group "
            f"({dist.get_rank()}/{dist.get_world_size()})"
        )
    all_image = _gather(image_features, rank, 0, gather_with_grad, keep_local=True)
    all_text = _gather(text_features, rank, 1, gather_with_grad, keep_local=True)
    all_labels = None
    all_ids = None
    with torch.no_grad():
        if labels is not None:
            all_labels = torch.cat(_all_gather_plain(labels), dim=0)
        if text_ids is not None:
            all_ids = torch.cat(_all_gather_plain(text_ids), dim=1)
    return all_image, all_text, all_labels, all_ids
