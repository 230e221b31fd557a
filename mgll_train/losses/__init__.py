"""The training objectives, one class each, and :func:`create_loss` that picks one from flags.

Layout:

* :mod:`.common` — what objectives share: option checks, text ids (:func:`text_ids_for`),
  label and text co-occurrence matrices (the soft targets), input checks, gathering the global
  batch and its logits.
* :mod:`.base` — :class:`MultiGranularLoss`, the base class: distributed options, the common
  ``forward`` (checks, device, autocast off) and a once-per-instance warning.
* :mod:`.mgll` — :class:`MGLLLoss` (``--loss mgll``), :mod:`.clip` — :class:`ClipLoss`
  (``--loss clip``), :mod:`.official` — :class:`OfficialMGLLLoss` (``--loss mgll-official``).
* :mod:`.tokenwise` — :class:`TokenObjective`, the base of objectives that read patch and word
  tokens through trainable heads of their own: :mod:`.mgca` — :class:`MGCALoss`
  (``--loss mgca``), :mod:`.g2d` — :class:`G2DLoss` (``--loss g2d``, ``--dense-loss g2d``).
* :mod:`.factory` — :data:`LOSSES` (name → class) and :func:`create_loss`.

Every objective takes one rank's batch — image features ``[B, D]``, text features ``[G, B, D]``,
the exponentiated scale, and optionally the point-wise bias, labels ``[B, K]`` and text ids
``[G, B]`` — and returns ``{"loss", "soft_contrastive", "pointwise", "kl"}`` (0-dim tensors;
the training loop logs all four, so an objective without a term returns a zero for it).

Adding an objective (say ``--loss mgca``):

1. Write ``losses/mgca.py`` with ``class MGCALoss(MultiGranularLoss)``: set ``name = "mgca"``;
   set ``normalized_features`` / ``uses_logit_bias`` if the model must give raw features or a
   learnable bias; implement ``compute(self, inputs: LossInputs)``, using
   ``self.global_logits(inputs)`` for this rank's logits against the global batch and
   ``cooccurrence_targets`` / ``label_cooccurrence`` for soft targets, and return
   ``loss_terms(...)``. Options of its own go in ``__init__`` (validated there) and in a
   ``from_args`` classmethod that reads them from the fit flags.
2. Add the class to :data:`LOSSES` in :mod:`.factory` and export it here.
3. Add the name to the ``--loss`` choices (and any new flags) in :mod:`mgll_train.config`.
4. Test it like ``tests/test_loss.py`` (hand-computed cases, gradcheck) and add its
   configurations to ``tests/test_loss_distributed.py`` (global batch = one process).
"""

from .base import MultiGranularLoss
from .clip import ClipLoss
from .common import (
    LossInputs,
    cooccurrence_targets,
    label_cooccurrence,
    loss_terms,
    text_cooccurrence,
    text_hash,
    text_ids_for,
)
from .factory import DENSE_LOSSES, LOSSES, create_loss, loss_class
from .g2d import G2DLoss
from .mgca import MGCALoss
from .mgll import MGLLLoss
from .official import OfficialMGLLLoss
from .tokenwise import TokenObjective

__all__ = [
    "DENSE_LOSSES",
    "LOSSES",
    "ClipLoss",
    "G2DLoss",
    "LossInputs",
    "MGCALoss",
    "MGLLLoss",
    "MultiGranularLoss",
    "OfficialMGLLLoss",
    "TokenObjective",
    "cooccurrence_targets",
    "create_loss",
    "label_cooccurrence",
    "loss_class",
    "loss_terms",
    "text_cooccurrence",
    "text_hash",
    "text_ids_for",
]
