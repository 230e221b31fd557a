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

from .checkpoint import load_weights
from .errors import UserError
from .tokens import TokenBatch, TokenPlan, join_texts

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


def model_from_checkpoint(
    state: dict[str, Any], path: Path, device: str | torch.device = "cpu"
) -> ModelBundle:
    """The open_clip model of a loaded checkpoint ``state`` (read from ``path``) with its weights;
    an unknown model or weights that do not fit are a one-line `UserError` naming the file."""
    try:
        bundle = create_model(
            state["model_name"],
            None,
            device=device,
            init_logit_bias=DEFAULT_LOGIT_BIAS if "logit_bias" in state["state_dict"] else None,
            weights_follow=True,
        )
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    load_weights(bundle.model, state, path)
    return bundle


def shipped_models() -> list[str]:
    """Names of the model configs shipped with mgll_train."""
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


class FeatureModel(torch.nn.Module):
    """One forward for the image batch and all G text batches, so DDP sees a single call.

    Returns normalised features, or the projected unnormalised ones that `--loss mgll-official`
    needs (the reference code normalises nothing). With a :class:`~mgll_train.tokens.TokenPlan`
    (token losses: ``--loss mgca``, ``g2d``, ``--dense-loss g2d``) it also captures token-level
    features and returns what the plan's heads make of them under ``"dense"``; the heads are
    part of this module, so DDP averages their gradients and checkpoints hold them.
    """

    def __init__(
        self, clip: torch.nn.Module, normalize: bool = True, plan: TokenPlan | None = None
    ):
        super().__init__()
        self.clip = clip
        self.normalize = normalize
        self.plan = plan
        self.heads = plan.heads if plan is not None else None

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of `images` `[B, ...]` and `texts` `[G, B, L]`, the scale (exp'd), the bias."""
        if self.plan is not None:
            return self._forward_tokens(images, texts, self.plan)
        g, b, length = texts.shape
        text_features = self.clip.encode_text(texts.reshape(g * b, length), self.normalize)
        out = {
            "image_features": self.clip.encode_image(images, self.normalize),
            "text_features": text_features.reshape(g, b, -1),
        }
        return self._with_scale(out)

    def heads_state(self) -> dict[str, Any]:
        """``{"heads": state}`` of the token-loss heads for a checkpoint, ``{}`` without."""
        return {"heads": self.heads.state_dict()} if self.heads is not None else {}

    def load_heads(self, state: dict[str, Any], path: Path) -> None:
        """Load a checkpoint's token-loss heads (one line naming the file when they are
        missing or do not fit); nothing to do without heads."""
        if self.heads is None:
            return
        try:
            self.heads.load_state_dict(state["heads"])
        except (KeyError, RuntimeError) as err:
            raise UserError(
                f"{path}: no token-loss heads that fit this run's --loss "
                f"({str(err).splitlines()[0][:200]}); expected a checkpoint of the same run"
            ) from None

    def _with_scale(self, out: dict[str, Any]) -> dict[str, Any]:
        out["logit_scale"] = self.clip.logit_scale.exp()
        if getattr(self.clip, "logit_bias", None) is not None:
            out["logit_bias"] = self.clip.logit_bias
        return out

    def _forward_tokens(
        self, images: torch.Tensor, texts: torch.Tensor, plan: TokenPlan
    ) -> dict[str, Any]:
        """The features, plus ``"dense"``: the plan's heads on the captured tokens."""
        if plan.report_rows:  # one report text per sample, joined from the granularities
            texts = join_texts(texts[list(plan.report_rows)], plan.capture.vocab)[None]
        g, b, length = texts.shape
        flat = texts.reshape(g * b, length)
        with plan.capture.running(image=plan.image, text=plan.text):
            image_features = self.clip.encode_image(images, self.normalize)
            text_features = self.clip.encode_text(flat, self.normalize)
        tokens = TokenBatch(
            image=plan.capture.image_tokens() if plan.image else None,
            text=plan.capture.text_tokens(flat) if plan.text else None,
            image_size=(int(images.shape[-2]), int(images.shape[-1])),
        )
        out = {"image_features": image_features, "text_features": text_features.view(g, b, -1)}
        out["dense"] = plan.heads(image_features, out["text_features"], tokens)
        return self._with_scale(out)


@torch.no_grad()
def clamp_logit_scale(model: torch.nn.Module) -> None:
    """Keep exp(logit_scale) within [1, 100], as open_clip does after every step."""
    unwrapped = getattr(model, "module", model)
    unwrapped.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
