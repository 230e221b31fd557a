"""Batches' uint8 images → the model's normalised float input, on the model's device.

Images leave the data loader as uint8 (a quarter of the bytes to pin and copy of float32) and
are normalised here, after the copy: every consumer of batches (the training step, evaluation
features, the linear probe's and `--finetune`'s passes, segmentation) calls `model_input`, so
all of them see the same floats. The arithmetic is the one the loader used to do (through a
table of the 256 values per channel): ``(v / 255 - mean) / std`` in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from .images import image_config_from_model


@lru_cache(maxsize=16)
def _constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``255``, mean and std as ``[1, C, 1, 1]`` tensors on ``device``, copied there once."""
    shape = (1, len(mean), 1, 1)
    m = torch.tensor(mean, dtype=dtype).reshape(shape).to(device)
    s = torch.tensor(std, dtype=dtype).reshape(shape).to(device)
    # A tensor, not a Python scalar: division by a scalar may become a multiplication by its
    # reciprocal, which rounds differently from the division the loader did.
    full = torch.full(shape, 255.0, dtype=dtype).to(device)
    return full, m, s


def normalize_images(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``[B, C, H, W]`` uint8 images → ``(v / 255 - mean[c]) / std[c]`` in ``dtype`` on
    ``device``; the copy is non-blocking (overlaps the step when the batch is pinned)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images from the loader, got {images.dtype}")
    device = torch.device(device)
    full, m, s = _constants(tuple(map(float, mean)), tuple(map(float, std)), device, dtype)
    x = images.to(device, non_blocking=True).to(dtype)
    return x.div_(full).sub_(m).div_(s)


def model_input(
    images: torch.Tensor,
    model: torch.nn.Module,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`normalize_images` with the mean and std of ``model`` (an open_clip model)."""
    _, mean, std = image_config_from_model(model)
    return normalize_images(images, mean, std, device, dtype)
