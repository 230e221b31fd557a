"""One optimizer step: gradient accumulation over cached features equals the whole batch."""

from __future__ import annotations

import copy
from contextlib import suppress

import pytest
import torch

from mgll_train.loss import MGLLLoss, text_ids_for
from mgll_train.model import create_model
from mgll_train.train import FeatureModel, _train_step


def _batch(bundle, n: int = 8) -> dict:
    torch.manual_seed(1)
    categories = ["Cardiomegaly", "No Finding", "Edema", "Cardiomegaly"] * (n // 4)
    texts = [categories, [f"Finding number {i % 3}." for i in range(n)]]
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [1.0, 0.0]] * (n // 4))
    return {
        "images": torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8),
        "texts": torch.stack([bundle.tokenizer(t) for t in texts]),
        "labels": labels,
        "text_ids": text_ids_for(texts),
    }


@pytest.mark.parametrize("clip_norm", [None, 0.5])
def test_accumulated_step_equals_the_whole_batch_step(clip_norm):
    torch.manual_seed(0)
    bundle = create_model("mgll-tiny")
    batch = _batch(bundle)
    results = []
    for accum in (1, 2, 4):
        model = FeatureModel(copy.deepcopy(bundle.model))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = _train_step(
            model,
            MGLLLoss(),
            optimizer,
            None,
            suppress,
            batch,
            torch.device("cpu"),
            accum_freq=accum,
            grad_clip_norm=clip_norm,
        )
        results.append((losses["loss"].item(), model.clip.state_dict()))
    (loss_1, state_1), *others = results
    for loss, state in others:
        assert loss == pytest.approx(loss_1, rel=1e-5)
        for key, value in state_1.items():
            assert torch.allclose(state[key], value, atol=1e-6), key
    if clip_norm is not None:  # the clipped step moved the weights less than plain SGD would
        moved = sum((state_1[k] - bundle.model.state_dict()[k]).norm() ** 2 for k in state_1)
        assert moved.sqrt().item() <= 0.1 * clip_norm + 1e-6
