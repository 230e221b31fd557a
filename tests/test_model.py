"""open_clip models for MGLL: the shipped tiny config, the learnable scalars, tower locking."""

from __future__ import annotations

import math

import pytest
import torch

from mgll_train.errors import UserError
from mgll_train.loss import MGLLLoss, text_ids_for
from mgll_train.model import clamp_logit_scale, create_model, shipped_models


def test_tiny_model_offline_with_learnable_scalars():
    assert "mgll-tiny" in shipped_models()
    bundle = create_model("mgll-tiny")
    model = bundle.model
    assert model.logit_bias.item() == pytest.approx(-10.0)
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert bundle.preprocess_cfg["size"] in (64, (64, 64))
    assert bundle.context_length == 64
    tokens = bundle.tokenizer(["No pleural effusion."])
    assert tokens.shape == (1, 64) and tokens[0, 0].item() == 49406
    out = model(torch.randn(2, 3, 64, 64), bundle.tokenizer(["a", "b"]))
    assert out["image_features"].shape == (2, 64)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(2), atol=1e-5)


def test_unknown_model_names_the_choices():
    with pytest.raises(UserError, match="mgll-tiny"):
        create_model("no-such-model")


def test_mgll_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    bundle = create_model("mgll-tiny")
    model = bundle.model
    texts = [
        ["Cardiomegaly", "No Finding", "Cardiomegaly", "Pleural Effusion"],
        ["Big heart.", "Normal.", "Large heart.", "Fluid."],
    ]
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    tokens = torch.stack([bundle.tokenizer(t) for t in texts])
    images = torch.randn(4, 3, 64, 64)
    loss_fn = MGLLLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        image_features = model.encode_image(images, normalize=True)
        text_features = torch.stack([model.encode_text(t, normalize=True) for t in tokens])
        out = loss_fn(
            image_features,
            text_features,
            model.logit_scale.exp(),
            logit_bias=model.logit_bias,
            labels=labels,
            text_ids=text_ids_for(texts),
        )
        optimizer.zero_grad()
        out["loss"].backward()
        assert model.logit_bias.grad is not None and model.logit_scale.grad is not None
        optimizer.step()
        clamp_logit_scale(model)
        losses.append(out["loss"].item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


def test_lock_image_freezes_the_visual_tower():
    model = create_model("mgll-tiny", lock_image=True).model
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert any(p.requires_grad for p in model.transformer.parameters())
    model = create_model("mgll-tiny", lock_text=True).model
    assert not any(p.requires_grad for p in model.transformer.parameters())
    assert all(p.requires_grad for p in model.visual.parameters())


def test_logit_scale_is_clamped_to_100():
    model = create_model("mgll-tiny").model
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    clamp_logit_scale(model)
    assert model.logit_scale.exp().item() == pytest.approx(100.0)
