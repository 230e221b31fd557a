"""The MGLL objective as a plug-and-play PyTorch module: the public import path.

The objectives live in :mod:`mgll_train.losses` (one class each; see its docstring for the
layout and how to add one); this module re-exports the public names.

Usage (the learnable scale and point-wise bias live on the model)::

    from mgll_train.loss import MGLLLoss
    loss_fn = MGLLLoss(soft_target="jaccard", weights=(1.0, 1.0, 1.0), rank=0, world_size=1,
                       gather_with_grad=True, local_loss=False)
    out = loss_fn(image_features,      # [B, D] (normalised unless the objective says otherwise)
                  text_features,       # [G, B, D]
                  logit_scale,         # scalar tensor, already exp'd
                  logit_bias=bias,     # scalar tensor for the point-wise term
                  labels=labels,       # [B, K] float, 1/0/-1/NaN
                  text_ids=text_ids)   # [G, B] int64 (optional)
    out["loss"], out["soft_contrastive"], out["pointwise"], out["kl"]

``MGLLLoss(mode="clip")`` and ``MGLLLoss(mode="mgll-official")`` still work: they return a
:class:`ClipLoss` and an :class:`OfficialMGLLLoss` built from the same arguments.
"""

from __future__ import annotations

from mgll_train.losses import (
    ClipLoss,
    MGLLLoss,
    MultiGranularLoss,
    OfficialMGLLLoss,
    create_loss,
    label_cooccurrence,
    text_cooccurrence,
    text_hash,
    text_ids_for,
)

__all__ = [
    "ClipLoss",
    "MGLLLoss",
    "MultiGranularLoss",
    "OfficialMGLLLoss",
    "create_loss",
    "label_cooccurrence",
    "text_cooccurrence",
    "text_hash",
    "text_ids_for",
]
