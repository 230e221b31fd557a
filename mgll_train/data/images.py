"""Image bytes → the model's input tensor: decode, pad to square, (augment,) resize, normalise.

Images are padded to square with 0 (black: radiographs and fundus photographs have black
surroundings), centred, aspect kept, nothing cropped; grey becomes 3 identical channels; bicubic
resize; the model's mean/std. Never flipped. The optional training augmentation is a mild random
resized crop of the padded square (scale 0.9–1.0, aspect ratio 0.95–1.05).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

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


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to an 8-bit ``L`` or ``RGB`` Pillow image."""
    image = Image.open(io.BytesIO(data))
    image.load()
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


def pad_resize(image: Image.Image, size: int, crop: tuple[float, ...] | None = None) -> Image.Image:
    """Pad to a centred square with 0 (aspect kept, nothing cropped) and resize to ``size``.

    ``crop`` is an optional ``(left, top, right, bottom)`` box in the padded square's
    coordinates (the augmentation's random resized crop).
    """
    width, height = image.size
    side = max(width, height)
    if crop is None:
        scale = size / side
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        canvas = Image.new(image.mode, (size, size), 0)
        canvas.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
        return canvas
    canvas = Image.new(image.mode, (side, side), 0)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas.resize((size, size), Image.Resampling.BICUBIC, box=crop)


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


def image_to_tensor(
    image: Image.Image, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """``[3, H, W]`` float32, grey replicated to 3 channels, normalised with mean/std."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
