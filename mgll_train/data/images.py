"""Image bytes → the model's input pixels: decode, pad to square, (augment,) resize.

Images are padded to square with 0 (black: radiographs and fundus photographs have black
surroundings), centred, aspect kept, nothing cropped; grey becomes 3 identical channels; bicubic
resize; uint8 out (the model's mean/std are applied on its device: `normalize.py`). Never
flipped. The optional training augmentation is a mild random resized crop of the padded square
(scale 0.9–1.0, aspect ratio 0.95–1.05).

Decoding dominates a training sample's cost, so the training path (`decode_scaled`,
`pad_resize(reducing_gap=...)`) works at the model's resolution: a JPEG is decoded at 1/2, 1/4
or 1/8 scale (DCT scaling), and an image still at least twice the model's size is box-reduced
by an integer factor before the bicubic resize. Pixels stay uint8 throughout. Against one
bicubic resize from full resolution this differs by under one grey level on average
(`tests/test_loader_equivalence.py` bounds it); an image smaller than twice the model's size is
resized exactly as before. Pillow decodes everything: torchvision's PNG decoder gives the same
pixels but was barely faster and is deprecated.
"""

from __future__ import annotations

import io
import math
import zlib

import numpy as np
import torch
from PIL import Image

from ..errors import UserError


def image_config_from_model(
    model: torch.nn.Module,
) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """``(image_size, mean, std)`` from an open_clip model's preprocess configuration."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise UserError(f"non-square model input size {size} is not supported")
        size = size[0]
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    return int(size), mean, std


class UnreadableImage(Exception):
    """Image bytes that do not decode (truncated, corrupt, missing, a decompression bomb)."""


# What Pillow raises for bytes it cannot decode; anything else is a bug and propagates.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error)


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to an 8-bit ``L`` or ``RGB`` Pillow image; bytes that do not decode
    raise `UnreadableImage`."""
    return decode_scaled(data)[0]


def decode_scaled(data: bytes, min_side: int | None = None) -> tuple[Image.Image, float]:
    """`decode_image`, and the factor the sides were reduced by (1.0 unless reduced).

    With ``min_side``, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose
    longest side is still at least ``min_side``.
    """
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only; refuses bombs
        stored = max(image.size)
        if min_side is not None and image.format == "JPEG":
            scale = min(1.0, min_side / stored)
            image.draft(image.mode, tuple(max(1, math.ceil(d * scale)) for d in image.size))
        image.load()
    except (*_DECODE_ERRORS, Image.DecompressionBombError) as err:
        raise UnreadableImage(f"{type(err).__name__}: {err}") from err
    return _to_8bit(image), stored / max(image.size)


def _to_8bit(image: Image.Image) -> Image.Image:
    """A loaded image as 8-bit ``L`` or ``RGB`` (16-bit and float grey stretched to 0–255)."""
    if image.mode in ("L", "RGB"):
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
    if image.mode in ("LA", "La"):
        return image.convert("L")
    return image.convert("RGB")


def pad_resize(
    image: Image.Image,
    size: int,
    crop: tuple[float, ...] | None = None,
    reducing_gap: float | None = None,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Image.Image:
    """Pad to a centred square with 0 (aspect kept, nothing cropped) and resize to ``size``.

    ``crop`` is an optional ``(left, top, right, bottom)`` box in the padded square's
    coordinates (the augmentation's random resized crop). ``reducing_gap`` is Pillow's: an
    image more than ``reducing_gap`` times the target is first box-reduced by an integer
    factor (None: one resize from full resolution). ``resample``: bicubic for images, NEAREST
    for masks (same geometry, values kept 0/255).
    """
    width, height = image.size
    side = max(width, height)
    if crop is None:
        scale = size / side
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        resized = image.resize((new_w, new_h), resample, reducing_gap=reducing_gap)
        canvas = Image.new(image.mode, (size, size), 0)
        canvas.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
        return canvas
    canvas = Image.new(image.mode, (side, side), 0)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas.resize((size, size), resample, box=crop, reducing_gap=reducing_gap)


def random_crop_box(
    side: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (0.95, 1.05),
) -> tuple[float, float, float, float]:
    """A mild random-resized-crop box inside a ``side``×``side`` square."""
    area = side * side * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = min(side, math.sqrt(area * aspect))
    h = min(side, math.sqrt(area / aspect))
    left, top = rng.uniform(0, side - w), rng.uniform(0, side - h)
    return (left, top, left + w, top + h)


def image_to_uint8(image: Image.Image) -> torch.Tensor:
    """``[3, H, W]`` uint8, grey replicated to 3 channels: the loader's image, normalised on
    the device by `mgll_train.data.normalize.model_input`."""
    pixels = np.asarray(image, dtype=np.uint8)  # read-only: Pillow's buffer
    if pixels.ndim == 2:
        planes = np.broadcast_to(pixels, (3, *pixels.shape))
    else:
        planes = pixels.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(planes))  # the one copy, writable
