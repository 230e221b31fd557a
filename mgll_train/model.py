"""open_clip models for MGLL: any open_clip model name, plus the tiny config shipped here.

The learnable scale (``logit_scale``, init log(1/0.07)) and the point-wise bias
(``logit_bias``, init -10 as in SigLIP) live on the model, so they are saved, averaged by DDP
and exported with it. Nothing here needs the network unless ``pretrained`` names a tag whose
weights are not cached.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import open_clip
import torch

from .errors import UserError

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
MAX_LOGIT_SCALE = math.log(100.0)  # the scale s = exp(logit_scale) is clamped to at most 100
DEFAULT_LOGIT_BIAS = -10.0


class _RandomInitWarningFilter(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly" warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def weights_loaded_next() -> Iterator[None]:
    """Silence open_clip's random-initialisation warning while creating a model whose trained
    weights the caller loads next (export, eval, resume): there the warning is untrue."""
    root = logging.getLogger()  # open_clip warns through the root logger
    quiet = _RandomInitWarningFilter()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


@cache
def register_model_configs() -> None:
    """Make the configs shipped with mgll_train (e.g. ``mgll-tiny``) known to open_clip."""
    open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass
class ModelBundle:
    """A model with what the data pipeline needs from it."""

    model: torch.nn.Module
    tokenizer: Any
    preprocess_cfg: dict[str, Any]  # image size, mean, std, ... of the model

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.context_length)


def create_model(
    model_name: str,
    pretrained: str | None = None,
    *,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    init_logit_bias: float | None = DEFAULT_LOGIT_BIAS,
    lock_image: bool = False,
    lock_text: bool = False,
    grad_checkpointing: bool = False,
    weights_follow: bool = False,
) -> ModelBundle:
    """Create an open_clip model with a learnable point-wise bias.

    ``pretrained`` is an open_clip tag or a path to a checkpoint; ``None`` means random
    initialisation (the tests and CPU runs). ``lock_image``/``lock_text`` freeze a tower as
    open_clip's ``--lock-image``/``--lock-text`` do. ``weights_follow``: the caller loads
    trained weights into the model next, so open_clip's random-initialisation warning is
    silenced.
    """
    register_model_configs()
    if model_name not in open_clip.list_models() and not model_name.startswith(
        ("hf-hub:", "local-dir:")
    ):
        raise UserError(
            f"unknown model {model_name!r}; use an open_clip model name "
            f"(e.g. ViT-B-16) or one shipped with mgll_train: {shipped_models()}"
        )
    with weights_loaded_next() if weights_follow else contextlib.nullcontext():
        model = open_clip.create_model(
            model_name,
            pretrained=pretrained,
            precision=precision,
            device=device,
            output_dict=True,
            init_logit_bias=init_logit_bias,
        )
    if lock_image:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
    if lock_text:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return ModelBundle(
        model=model,
        tokenizer=open_clip.get_tokenizer(model_name),
        preprocess_cfg=dict(open_clip.get_model_preprocess_cfg(model)),
    )


def shipped_models() -> list[str]:
    """Names of the model configs shipped with mgll_train."""
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


class FeatureModel(torch.nn.Module):
    """One forward for the image batch and all G text batches, so DDP sees a single call.

    Returns normalised features, or the projected unnormalised ones that `--loss mgll-official`
    needs (the reference code normalises nothing).
    """

    def __init__(self, clip: torch.nn.Module, normalize: bool = True):
        super().__init__()
        self.clip = clip
        self.normalize = normalize

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of `images` `[B, ...]` and `texts` `[G, B, L]`, the scale (exp'd), the bias."""
        g, b, length = texts.shape
        text_features = self.clip.encode_text(texts.reshape(g * b, length), self.normalize)
        out = {
            "image_features": self.clip.encode_image(images, self.normalize),
            "text_features": text_features.reshape(g, b, -1),
            "logit_scale": self.clip.logit_scale.exp(),
        }
        if getattr(self.clip, "logit_bias", None) is not None:
            out["logit_bias"] = self.clip.logit_bias
        return out


@torch.no_grad()
def clamp_logit_scale(model: torch.nn.Module) -> None:
    """Keep exp(logit_scale) within [1, 100], as open_clip does after every step."""
    unwrapped = getattr(model, "module", model)
    unwrapped.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
