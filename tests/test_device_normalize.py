"""Batches leave the loader as uint8; every consumer normalises them on its device the same way.

The expected model input is torchvision's `Normalize` on the uint8 pixels scaled to [0, 1] (the
old loader's float batch), an implementation independent of `mgll_train.data.normalize`. The
model input is observed with a forward pre-hook on every open_clip vision tower that runs: the
training step, evaluation's feature pass and `--finetune`'s copy of the tower.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from open_clip.transformer import VisionTransformer
from torch.nn.modules.module import register_module_forward_pre_hook
from torchvision.transforms import Normalize

from mgll_train.data import collate, make_dataset
from mgll_train.data.images import image_config_from_model
from mgll_train.data.normalize import model_input, normalize_images
from mgll_train.data.transforms import SampleTransform
from mgll_train.evaluate.features import eval_transform, extract_features
from mgll_train.evaluate.probe import finetune_and_score
from mgll_train.feed import Feed
from mgll_train.loss import MGLLLoss
from mgll_train.model import create_model
from mgll_train.sampler import GlobalBatchSampler
from mgll_train.train import FeatureModel, _train_step
from tests.conftest import small_demo_build

ATOL = 1e-6  # float32 rounding of values within about ±2.2


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 24-image demo build at 64 px."""
    return small_demo_build(tmp_path_factory.mktemp("device-normalize"), n=24)


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    return create_model("mgll-tiny")


def expected_input(images: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """What the old loader produced: the pixels in [0, 1], normalised by torchvision."""
    _, mean, std = image_config_from_model(model)
    return Normalize(mean, std)(images.float() / 255.0)


@contextlib.contextmanager
def tower_inputs() -> Iterator[list[torch.Tensor]]:
    """Every input an open_clip vision tower receives while the block runs."""
    seen: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, VisionTransformer):
            seen.append(args[0].detach().clone())

    handle = register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def test_loader_batches_are_uint8(built, bundle):
    transform = SampleTransform.from_model(bundle.model, bundle.tokenizer)
    dataset = make_dataset(str(built), transform, split="train")
    feed = Feed(dataset, len(dataset), 2, 4, GlobalBatchSampler(len(dataset), 4, seed=0))
    batch = next(iter(feed.batches(0, 0, 0, workers=1, pin_memory=False)))
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (4, 3, 64, 64)
    assert batch["images"].max() > 0  # real pixels, not the placeholder


def test_normalisation_matches_torchvision_on_every_value(bundle):
    values = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(2, 3, 16, 16)
    got = model_input(values, bundle.model, "cpu")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected_input(values, bundle.model), atol=ATOL, rtol=0)
    half = normalize_images(values, (0.5,) * 3, (0.5,) * 3, "cpu")
    assert half[0, 0, 0, 0] == -1.0 and half[0, 0, -1, -1] == 1.0  # 0 → -1, 255 → +1


def test_float_images_are_refused():
    with pytest.raises(TypeError, match="uint8"):
        normalize_images(torch.zeros(1, 3, 4, 4), (0.5,) * 3, (0.5,) * 3, "cpu")


def test_training_step_feeds_the_normalised_batch(built, bundle):
    transform = SampleTransform.from_model(bundle.model, bundle.tokenizer)
    dataset = make_dataset(str(built), transform, split="train")
    batch = collate([dataset[i] for i in range(8)])
    model = FeatureModel(bundle.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with tower_inputs() as seen:
        _train_step(
            model, MGLLLoss(), optimizer, None, contextlib.nullcontext, batch, torch.device("cpu")
        )
    assert len(seen) == 1
    want = expected_input(batch["images"], bundle.model)
    torch.testing.assert_close(seen[0], want, atol=ATOL, rtol=0)


def test_evaluation_features_are_of_the_normalised_images(built, bundle):
    args = argparse.Namespace(uncertain="ignore", unmentioned="ignore")
    transform = eval_transform(bundle.model, bundle.tokenizer, args)
    dataset = make_dataset(str(built), transform, split="train")
    with tower_inputs() as seen:
        feats = extract_features(
            bundle.model, dataset, 5, 0, torch.device("cpu"), texts=False, progress=False
        )
    pixels = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    want = expected_input(pixels, bundle.model)
    torch.testing.assert_close(torch.cat(seen), want, atol=ATOL, rtol=0)
    with torch.no_grad():
        direct = bundle.model.encode_image(want, normalize=False)
    np.testing.assert_allclose(feats.image, direct.numpy(), atol=1e-5)


def test_finetune_trains_and_scores_on_the_normalised_images(built, bundle):
    transform = eval_transform(
        bundle.model, bundle.tokenizer, argparse.Namespace(uncertain="ignore", unmentioned="ignore")
    )
    dataset = make_dataset(str(built), transform, split="train")
    pixels = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    want = expected_input(pixels, bundle.model)
    args = argparse.Namespace(
        seed=0, finetune_lr=1e-4, probe_epochs=1, workers=0, batch_size=len(dataset)
    )
    rows = np.arange(8)
    with tower_inputs() as seen:
        labels = len(dataset.label_names)
        finetune_and_score(bundle.model, dataset, rows, dataset, labels, args, torch.device("cpu"))
    images = torch.cat(seen)
    assert len(images) == 1 + len(rows) + len(dataset)  # head size, training, scoring
    for image in images:  # each is one row's normalised image, in whatever order
        closest = (want - image).abs().flatten(1).amax(1).min()
        assert closest <= ATOL
