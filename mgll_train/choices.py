"""The values of the flags that pick an objective, a target, a label or a text policy.

Kept apart from `mgll_train.data`, which loads torch: the parsers read these, and
`mgll-train --help` or a mistyped flag should answer before torch loads.
"""

from __future__ import annotations

from typing import Literal

UncertainPolicy = Literal["ignore", "positive", "negative"]
UnmentionedPolicy = Literal["negative", "ignore"]
TextSampling = Literal["truncate", "sentences"]
SoftTarget = Literal["jaccard", "overlap", "exact"]
PointwiseTarget = Literal["binary", "graded"]

# The values of --uncertain, --unmentioned and --text-sampling.
UNCERTAIN_POLICIES: tuple[UncertainPolicy, ...] = ("ignore", "positive", "negative")
UNMENTIONED_POLICIES: tuple[UnmentionedPolicy, ...] = ("negative", "ignore")
TEXT_SAMPLINGS: tuple[TextSampling, ...] = ("truncate", "sentences")
# The values of --soft-target and --pointwise-target (the losses check them too).
SOFT_TARGETS: tuple[SoftTarget, ...] = ("jaccard", "overlap", "exact")
POINTWISE_TARGETS: tuple[PointwiseTarget, ...] = ("binary", "graded")
# The values of --loss and --dense-loss: the names of the classes in losses/factory.py (a test
# keeps them equal; the factory imports torch, which the parser must not).
LOSS_NAMES = ("mgll", "clip", "mgll-official", "mgca", "g2d")
DENSE_LOSS_NAMES = ("none", "g2d")

__all__ = [
    "DENSE_LOSS_NAMES",
    "LOSS_NAMES",
    "POINTWISE_TARGETS",
    "SOFT_TARGETS",
    "TEXT_SAMPLINGS",
    "UNCERTAIN_POLICIES",
    "UNMENTIONED_POLICIES",
    "PointwiseTarget",
    "SoftTarget",
    "TextSampling",
    "UncertainPolicy",
    "UnmentionedPolicy",
]
