"""The values of the flags that pick a label or text policy (`fit` and `eval`).

Kept apart from `mgll_train.data`, which loads torch: the parsers read these, and
`mgll-train --help` or a mistyped flag should answer before torch loads.
"""

from __future__ import annotations

from typing import Literal

UncertainPolicy = Literal["ignore", "positive", "negative"]
UnmentionedPolicy = Literal["negative", "ignore"]
TextSampling = Literal["truncate", "sentences"]

# The values of --uncertain, --unmentioned and --text-sampling.
UNCERTAIN_POLICIES: tuple[UncertainPolicy, ...] = ("ignore", "positive", "negative")
UNMENTIONED_POLICIES: tuple[UnmentionedPolicy, ...] = ("negative", "ignore")
TEXT_SAMPLINGS: tuple[TextSampling, ...] = ("truncate", "sentences")

__all__ = [
    "TEXT_SAMPLINGS",
    "UNCERTAIN_POLICIES",
    "UNMENTIONED_POLICIES",
    "TextSampling",
    "UncertainPolicy",
    "UnmentionedPolicy",
]
