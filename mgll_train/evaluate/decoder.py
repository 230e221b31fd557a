"""The decoder of `eval --tasks segmentation`: patch tokens of the frozen image tower, and the
light SETR-PUP decoder of G2D (`losses/g2d.py`) trained on them.

The image tower is frozen, so its patch tokens are computed once per split (kept as float16 on
the CPU) and every training subset and epoch reads them from there. The decoder's loss is
``(1 − Dice) + BCE`` (Dice on the sigmoid, smoothed by 1); AdamW with weight decay 1e-4, batches
of 16, the learning rate decayed to 0 along a cosine. Its prediction is ``logit > 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data.normalize import model_input
from ..errors import UserError
from ..losses.g2d import SegmentationDecoder, dice_bce
from ..tokens import TokenCapture
from .features import eval_batches, evaluating

BATCH = 16
UNKNOWN = 2  # the stored mask value of a row without a mask (a null `mask` cell)


@dataclass
class TokenSet:
    """Patch tokens and masks of every row of a split, in dataset order."""

    tokens: torch.Tensor  # [N, P, W] float16: patch tokens after ln_post
    masks: torch.Tensor  # [N, 1, S, S] uint8: 1 in a region, 0 outside, UNKNOWN without a mask
    grid: tuple[int, int]  # patch rows and columns

    @property
    def size(self) -> tuple[int, int]:
        """The model's input height and width (the masks' size)."""
        return tuple(self.masks.shape[-2:])  # type: ignore[return-value]

    @property
    def known(self) -> np.ndarray:
        """``[N]`` bool: rows that have a mask."""
        return (self.masks.flatten(1) != UNKNOWN).all(1).numpy()

    @property
    def has_region(self) -> np.ndarray:
        """``[N]`` bool: rows whose mask has at least one pixel on."""
        return (self.masks.flatten(1) == 1).any(1).numpy()


def vit_shape(model: torch.nn.Module) -> tuple[int, int]:
    """``(token width, patch size)`` of an open_clip ViT image tower; anything else is a
    `UserError` (segmentation reads patch tokens)."""
    visual = getattr(model, "visual", None)
    if not hasattr(getattr(visual, "transformer", None), "resblocks"):
        raise UserError(
            f"segmentation needs a ViT image tower (patch tokens); {type(visual).__name__} "
            "has no transformer blocks"
        )
    patch = visual.patch_size
    return int(visual.transformer.width), int(patch[0] if isinstance(patch, tuple) else patch)


@torch.no_grad()
def extract_tokens(
    model: torch.nn.Module,
    dataset: Any,
    batch_size: int,
    workers: int,
    device: torch.device,
    progress: bool | None = None,
) -> TokenSet:
    """Patch tokens and masks of every row of ``dataset`` (samples with ``mask``)."""
    vit_shape(model)
    capture = TokenCapture(model)
    tokens, masks = [], []
    grid = (0, 0)
    with evaluating(model):
        for batch in eval_batches(dataset, batch_size, workers, "patch tokens", progress):
            with capture.running(image=True, text=False):
                model.encode_image(model_input(batch["images"], model, device))
            image = capture.image_tokens()
            grid = image.grid
            tokens.append(image.patches.half().cpu())
            mask = batch["masks"]
            masks.append(torch.where(mask.isnan(), UNKNOWN, mask).to(torch.uint8))
    return TokenSet(torch.cat(tokens), torch.cat(masks), grid)


def train_decoder(
    data: TokenSet,
    rows: np.ndarray,
    width: int,
    patch: int,
    epochs: int,
    lr: float,
    seed: int,
    device: torch.device,
) -> SegmentationDecoder:
    """A decoder trained on ``rows`` of ``data`` (seeded: initialisation and batches); with
    ``epochs`` 0, the untrained decoder."""
    torch.manual_seed(seed)
    decoder = SegmentationDecoder(width, patch).to(device)
    steps = math.ceil(len(rows) / BATCH) * epochs
    if steps == 0:
        return decoder.eval()
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    order = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    decoder.train()
    with torch.enable_grad():  # evaluation during fit runs under no_grad
        for _ in range(epochs):
            shuffled = order[torch.randperm(len(order), generator=generator)]
            for batch in shuffled.split(BATCH):
                x = data.tokens[batch].to(device).float()
                y = data.masks[batch].to(device).float()
                loss = dice_bce(decoder(x, data.grid, data.size), y, bce_weight=1.0)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    return decoder.eval()


@torch.no_grad()
def predict(
    decoder: SegmentationDecoder, data: TokenSet, rows: np.ndarray, device: torch.device
) -> np.ndarray:
    """``[len(rows), S, S]`` bool: the decoder's masks (logit > 0) of ``rows`` of ``data``."""
    out = [np.zeros((0, *data.size), dtype=bool)]
    for batch in torch.from_numpy(np.asarray(rows, dtype=np.int64)).split(4 * BATCH):
        logits = decoder(data.tokens[batch].to(device).float(), data.grid, data.size)
        out.append((logits[:, 0] > 0).cpu().numpy())
    return np.concatenate(out)
