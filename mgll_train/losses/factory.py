"""From ``mgll-train fit`` flags to a loss: the registry of objectives and :func:`create_loss`."""

from __future__ import annotations

import argparse

from mgll_train.choices import DENSE_LOSS_NAMES
from mgll_train.errors import UserError

from .base import MultiGranularLoss
from .clip import ClipLoss
from .common import check_target_options
from .g2d import G2DLoss
from .mgca import MGCALoss
from .mgll import MGLLLoss
from .official import OfficialMGLLLoss

__all__ = ["DENSE_LOSSES", "LOSSES", "create_loss", "loss_class"]

#: Every objective by its ``--loss`` name.
LOSSES: dict[str, type[MultiGranularLoss]] = {
    cls.name: cls for cls in (MGLLLoss, ClipLoss, OfficialMGLLLoss, MGCALoss, G2DLoss)
}
#: The dense tasks ``--dense-loss`` adds to a global objective.
DENSE_LOSSES = DENSE_LOSS_NAMES


def loss_class(name: str) -> type[MultiGranularLoss]:
    """The objective called ``name`` (``--loss``); its class attributes say what the model
    must provide (``normalized_features``, ``uses_logit_bias``)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None


def create_loss(args: argparse.Namespace, rank: int = 0, world_size: int = 1) -> MultiGranularLoss:
    """The loss the fit flags ask for: ``--loss`` picks the class, which reads its own flags
    (``--soft-target``, ``--pointwise-target``, ``--loss-weights``, ``--local-loss``,
    ``--gather-with-grad``, ...); ``--dense-loss g2d`` adds G2D's dense task to it."""
    # Checked whatever --loss is, so a bad value (e.g. from a config file, whose values skip
    # argparse's choices) fails even when the chosen objective ignores it.
    check_target_options(args.soft_target, args.loss_weights, args.pointwise_target)
    objective = loss_class(args.loss).from_args(args, rank, world_size)
    dense = getattr(args, "dense_loss", "none") or "none"
    if dense not in DENSE_LOSSES:
        raise ValueError(f"unknown dense loss {dense!r}; choose one of {DENSE_LOSSES}")
    if dense == "none" or isinstance(objective, G2DLoss):  # --loss g2d has it already
        return objective
    if isinstance(objective, MGCALoss):
        raise UserError("--dense-loss g2d adds to a global objective; --loss mgca is not one")
    return G2DLoss.around(objective, args)
