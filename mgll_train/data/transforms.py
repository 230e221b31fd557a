"""A record (with its aligned labels) → a training sample: image, texts, labels, text ids, flags.

Randomness (augmentation, sentence sampling) comes from the generator the caller passes, which
the datasets seed per sample by `(seed, epoch, index)`, so a sample is identical whatever worker
reads it — what exact resume needs. `text_ids` are `mgll_data.record.text_hash` of each
granularity's final text (after sentence sampling), computed in the workers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from mgll_data.record import GRANULARITIES, GRANULARITY_COLUMNS, text_hash

from ..errors import UserError
from .images import (
    decode_image,
    image_config_from_model,
    image_to_tensor,
    pad_resize,
    random_crop_box,
)
from .labels import UncertainPolicy, UnmentionedPolicy, apply_label_policy
from .tokenizer import TextTokenizer

TextSampling = Literal["truncate", "sentences"]
TEXT_SAMPLINGS: tuple[TextSampling, ...] = ("truncate", "sentences")  # --text-sampling


@dataclass
class SampleTransform:
    """Turns a record (with its aligned labels) into a training sample (see module docstring)."""

    tokenizer: TextTokenizer
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    granularities: tuple[str, ...] = GRANULARITIES
    uncertain: UncertainPolicy = "ignore"
    unmentioned: UnmentionedPolicy = "negative"
    text_sampling: TextSampling = "truncate"
    augment: bool = False
    columns: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        unknown = [g for g in self.granularities if g not in GRANULARITY_COLUMNS]
        if unknown or not self.granularities:
            raise UserError(
                f"unknown granularities {unknown}; expected a list of "
                f"{','.join(GRANULARITY_COLUMNS)}"
            )
        if self.text_sampling not in TEXT_SAMPLINGS:
            raise UserError(f"text_sampling must be truncate|sentences, not {self.text_sampling}")
        self.granularities = tuple(self.granularities)
        self.columns = (
            "id",
            "image",
            "labels",
            *(GRANULARITY_COLUMNS[g] for g in self.granularities),
        )

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        tokenizer: Callable[..., torch.Tensor],
        context_length: int | None = None,
        **kwargs: Any,
    ) -> SampleTransform:
        """Image size and normalisation from ``model``; ``tokenizer`` from open_clip."""
        size, mean, std = image_config_from_model(model)
        return cls(TextTokenizer(tokenizer, context_length), size, mean, std, **kwargs)

    def image(self, data: bytes, rng: np.random.Generator) -> torch.Tensor:
        """Decode, pad to square, (augment,) resize and normalise one image."""
        image = decode_image(data)
        crop = random_crop_box(max(image.size), rng) if self.augment else None
        return image_to_tensor(pad_resize(image, self.image_size, crop), self.mean, self.std)

    def texts(
        self, record: dict[str, Any], rng: np.random.Generator
    ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """``(final texts, [G, L] tokens, [G] truncated flags)``."""
        final, tokens, truncated = [], [], []
        for g in self.granularities:
            text = record.get(GRANULARITY_COLUMNS[g]) or ""
            if self.text_sampling == "sentences":
                text = self.tokenizer.sample_sentences(text, rng)
            ids, cut = self.tokenizer.tokenize(text)
            final.append(text)
            tokens.append(ids)
            truncated.append(cut)
        return final, torch.stack(tokens), torch.tensor(truncated, dtype=torch.bool)

    def __call__(
        self,
        record: dict[str, Any],
        labels: np.ndarray,
        annotated: np.ndarray,
        rng: np.random.Generator,
    ) -> dict[str, Any]:
        """The sample: ``image [3,H,W]``, ``texts [G,L]``, ``labels [K]``, ``text_ids [G]``,
        ``truncated [G]`` and ``id``."""
        texts, tokens, truncated = self.texts(record, rng)
        policy = apply_label_policy(labels, annotated, self.uncertain, self.unmentioned)
        return {
            "image": self.image(record["image"]["bytes"], rng),
            "texts": tokens,
            "labels": torch.from_numpy(policy),
            "text_ids": torch.tensor([text_hash(t) for t in texts], dtype=torch.int64),
            "truncated": truncated,
            "id": record["id"],
        }
