"""What token-level objectives share: the base class, the report text, the shared heads.

A token objective (``--loss mgca``, ``--loss g2d``, ``--dense-loss g2d``) needs more than pooled
features. It says what through :meth:`TokenObjective.token_plan`: the model then captures patch
and word tokens (:mod:`mgll_train.tokens`) and runs the objective's trainable heads inside its
forward (so DDP averages their gradients and checkpoints hold them), and the loss receives the
heads' outputs as ``dense=``. The training loop tells it the epoch and step
(:meth:`TokenObjective.set_position`) for schedules such as frozen prototypes or a late start.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mgll_train.errors import UserError
from mgll_train.tokens import TokenCapture, TokenPlan

from .base import MultiGranularLoss
from .common import LossInputs

__all__ = ["TokenObjective", "mlp_head", "report_rows"]

#: The default report text of MGCA and G2D: impression and findings, joined.
DEFAULT_REPORT = ("description", "explanation")


def report_rows(report: Sequence[str], granularities: Sequence[str]) -> tuple[int, ...]:
    """Where the report's granularities are among the trained ones (``--granularities``)."""
    missing = [g for g in report if g not in granularities]
    if missing:
        raise UserError(
            f"--report-text {'+'.join(report)}: --granularities {','.join(granularities)} "
            f"lacks {', '.join(missing)}; expected the report's texts among them"
        )
    return tuple(list(granularities).index(g) for g in report)


def mlp_head(width: int, out: int, hidden: int | None = None) -> nn.Sequential:
    """Two linear layers with BatchNorm and ReLU between them: ``width → hidden → out``."""
    hidden = hidden or max(width, out)
    return nn.Sequential(
        nn.Linear(width, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out),
    )


class TokenObjective(MultiGranularLoss):
    """An objective that reads token-level features through heads of its own.

    A subclass implements :meth:`make_heads` (its trainable modules, sized for the model) and
    :meth:`compute_dense`; ``report`` names the granularities joined into one report text per
    sample (``()``: every granularity is encoded as usual).
    """

    #: Which towers' tokens the heads read.
    image_tokens: bool = True
    text_tokens: bool = True

    def __init__(self, report: Sequence[str] = (), **distributed: Any) -> None:
        super().__init__(**distributed)
        self.report = tuple(report)
        self.epoch = 0
        self.step = 0
        self.heads: nn.Module | None = None
        self._dense: dict[str, torch.Tensor] | None = None

    @staticmethod
    def parse_report(text: str) -> tuple[str, ...]:
        """``--report-text a+b`` as granularity names."""
        return tuple(part.strip() for part in text.split("+") if part.strip())

    def make_heads(self, clip: nn.Module) -> nn.Module:
        """The objective's trainable heads for ``clip`` (widths read from its towers)."""
        raise NotImplementedError

    def token_plan(
        self, clip: nn.Module, tokenizer: Any, granularities: Sequence[str]
    ) -> TokenPlan:
        """What the model must capture and the heads to run; creates :attr:`heads`."""
        rows = report_rows(self.report, granularities) if self.report else ()
        capture = TokenCapture(clip, tokenizer if self.text_tokens or rows else None)
        self.heads = self.make_heads(clip)
        return TokenPlan(
            capture=capture,
            heads=self.heads,
            image=self.image_tokens,
            text=self.text_tokens,
            report_rows=rows,
        )

    def set_position(self, epoch: int, step: int) -> None:
        """The epoch (completed epochs) and optimizer step about to run."""
        self.epoch, self.step = epoch, step

    def forward(  # type: ignore[override]
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
        labels: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
        dense: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """As :meth:`MultiGranularLoss.forward`, with the heads' outputs as ``dense``."""
        if dense is None:
            raise ValueError(f"--loss {self.name} needs dense= (the model's token heads' output)")
        if text_ids is not None and text_features.dim() == 3:
            if text_ids.shape[0] != text_features.shape[0]:
                text_ids = None  # a joined report has no granularity's text id
        self._dense = dense  # read by compute(), which the base class's forward calls
        try:
            return super().forward(
                image_features, text_features, logit_scale, logit_bias, labels, text_ids
            )
        finally:
            self._dense = None

    def compute(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        """:meth:`compute_dense` on the checked inputs and ``dense`` in their precision."""
        if self._dense is None:
            raise ValueError(f"--loss {self.name} is called with dense= (see forward)")
        dense = {
            k: v.to(inputs.dtype) if v.is_floating_point() else v for k, v in self._dense.items()
        }
        return self.compute_dense(inputs, dense)

    def compute_dense(
        self, inputs: LossInputs, dense: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The objective on checked inputs and the heads' outputs."""
        raise NotImplementedError

    @classmethod
    def report_from_args(cls, args: argparse.Namespace) -> tuple[str, ...]:
        """``--report-text`` (impression and findings joined unless told otherwise)."""
        text = getattr(args, "report_text", None)
        return cls.parse_report(text) if text else DEFAULT_REPORT
