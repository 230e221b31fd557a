"""A record (with its aligned labels) → a training sample: image, texts, labels, text ids, flags.

Randomness (augmentation, sentence sampling) comes from the generator the caller passes, which
the datasets seed per sample by `(seed, epoch, index)`, so a sample is identical whatever worker
reads it — what exact resume needs. `text_ids` are `mgll_data.record.text_hash` of each
granularity's final text (after sentence sampling), computed in the workers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from mgll_data.record import GRANULARITIES, GRANULARITY_COLUMNS, MASK_COLUMN, text_hash

from ..choices import TEXT_SAMPLINGS, TextSampling
from ..errors import UserError
from .images import (
    decode_image,
    decode_scaled,
    image_config_from_model,
    image_to_uint8,
    pad_resize,
    random_crop_box,
)
from .labels import UncertainPolicy, UnmentionedPolicy, apply_label_policy
from .tokenizer import TextTokenizer

# An image at least this many times the model's size is box-reduced by an integer factor
# before the bicubic resize (Pillow's `reducing_gap`): 512-px PNGs for a 224-px model resize
# twice as fast, within the tolerance tests/test_loader_equivalence.py checks.
REDUCING_GAP = 1.0


@dataclass
class SampleTransform:
    """Turns a record (with its aligned labels) into a training sample (see module docstring)."""

    tokenizer: TextTokenizer
    image_size: int
    # The model's normalisation, which the batches' consumers apply on the device
    # (`normalize.py`); images leave the transform as uint8.
    mean: tuple[float, ...]
    std: tuple[float, ...]
    granularities: tuple[str, ...] = GRANULARITIES
    uncertain: UncertainPolicy = "ignore"
    unmentioned: UnmentionedPolicy = "negative"
    text_sampling: TextSampling = "truncate"
    augment: bool = False
    # Data with no annotated label is refused when True (the MGLL losses, evaluation), only
    # warned about when False (--loss clip learns from the texts alone).
    labels_required: bool = True
    # Also read the optional `mask` column (segmentation): samples get ``mask`` [1, H, W].
    masks: bool = False
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
            *((MASK_COLUMN,) if self.masks else ()),
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
        """Decode (at reduced scale where the format allows), pad to square, (augment,) and
        resize one image: ``[3, S, S]`` uint8, normalised on the device (`normalize.py`)."""
        return self._image_and_geometry(data, rng)[0]

    def _image_and_geometry(
        self, data: bytes, rng: np.random.Generator
    ) -> tuple[torch.Tensor, tuple[int, int], tuple[float, ...] | None]:
        """The image tensor, the decoded image's size and the crop box used (None: none)."""
        image, reduced = decode_scaled(data, self.image_size)
        crop = None
        if self.augment:  # drawn in the stored image's coordinates: the same box at any scale
            box = random_crop_box(round(max(image.size) * reduced), rng)
            crop = tuple(v / reduced for v in box)
        square = pad_resize(image, self.image_size, crop, reducing_gap=REDUCING_GAP)
        return image_to_uint8(square), image.size, crop

    def mask(
        self, data: bytes | None, size: tuple[int, int], crop: tuple[float, ...] | None
    ) -> torch.Tensor:
        """``[1, S, S]`` float: 1 inside the mask, 0 outside, all NaN when the record has none.

        The mask is brought to the decoded image's ``size`` and then padded, cropped and
        resized exactly as the image, with NEAREST, so mask and image pixels stay aligned.
        """
        if not data:
            return torch.full((1, self.image_size, self.image_size), float("nan"))
        mask = decode_image(data).convert("L")
        nearest = Image.Resampling.NEAREST
        if mask.size != size:  # the image was decoded at reduced scale (JPEG)
            mask = mask.resize(size, nearest)
        square = pad_resize(mask, self.image_size, crop, resample=nearest)
        return torch.from_numpy(np.asarray(square) > 127).float()[None]

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
        decode: bool = True,
    ) -> dict[str, Any]:
        """The sample: ``image [3,H,W]`` uint8, ``texts [G,L]``, ``labels [K]``, ``text_ids [G]``,
        ``truncated [G]`` and ``id``. ``decode=False``: a black image in place of the record's
        (a placeholder for a batch that is refused). Bytes that do not decode (or a missing
        image) raise `UnreadableImage`."""
        texts, tokens, truncated = self.texts(record, rng)
        policy = apply_label_policy(labels, annotated, self.uncertain, self.unmentioned)
        size, crop = (self.image_size, self.image_size), None
        if decode:
            data = (record["image"] or {}).get("bytes") or b""
            image, size, crop = self._image_and_geometry(data, rng)
        else:
            image = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
        sample = {
            "image": image,
            "texts": tokens,
            "labels": torch.from_numpy(policy),
            "text_ids": torch.tensor([text_hash(t) for t in texts], dtype=torch.int64),
            "truncated": truncated,
            "id": record["id"],
        }
        if self.masks:
            mask_bytes = (record.get(MASK_COLUMN) or {}).get("bytes") if decode else None
            sample["mask"] = self.mask(mask_bytes, size, crop)
        return sample
