"""The training image path (reduced decode, uint8 until the normalisation on the device) against
the pipeline it replaced: one full-resolution decode, one bicubic resize, float normalisation.

The images are real demo builds (PNG and JPEG) with 64-px stored images; a 28-px model input
has the same ratio as 512-px images for a 224-px model (2.3x), a 16-px one a 4x ratio.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import open_clip
import psutil
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.demo.nih_release import write_demo_release
from mgll_train.data import make_dataset
from mgll_train.data.images import (
    UnreadableImage,
    decode_scaled,
    image_to_uint8,
    random_crop_box,
)
from mgll_train.data.normalize import normalize_images
from mgll_train.data.tokenizer import TextTokenizer
from mgll_train.data.transforms import SampleTransform
from mgll_train.feed import Feed
from mgll_train.sampler import GlobalBatchSampler

MEAN, STD = tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD)
STORED = 64
# Reduced decoding against one bicubic resize, in grey levels (0-255) per pixel. Measured: mean
# 1.6 (64 -> 28 px), 2.3 (64 -> 16 px), 0.65 (512-px demo images -> 224 px); maximum 12-20, at
# sharp edges, where box-reducing first changes the bicubic filter's ringing.
MEAN_LEVELS, MAX_LEVELS = 3.0, 24


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    """A 12-image demo built with PNG and with JPEG images: the build folders."""
    root = tmp_path_factory.mktemp("equivalence")
    raw = write_demo_release(root / "raw", n=12, seed=0, image_size=96)
    for fmt in ("png", "jpeg"):
        options = BuildOptions(progress=False, image_size=STORED, image_format=fmt)
        build(load_pipeline("chestxray14"), raw, root / fmt, options)
    return {fmt: root / fmt for fmt in ("png", "jpeg")}


@pytest.fixture(scope="module")
def stored(builds) -> dict[str, list[bytes]]:
    """The stored image bytes of each build."""
    images = {
        fmt: [
            row["image"]["bytes"]
            for shard in sorted((folder / "data").glob("*.parquet"))
            for row in pq.read_table(shard, columns=["image"]).to_pylist()
        ]
        for fmt, folder in builds.items()
    }
    assert len(images["png"]) == len(images["jpeg"]) == 12
    return images


class NormalisedTransform(SampleTransform):
    """The loader's uint8 image, normalised as every consumer of batches does it."""

    def image(self, data: bytes, rng: np.random.Generator) -> torch.Tensor:
        return normalize_images(super().image(data, rng)[None], MEAN, STD, "cpu")[0]


@functools.cache
def transform(size: int, augment: bool = False) -> SampleTransform:
    tokenizer = TextTokenizer(open_clip.get_tokenizer("ViT-B-16", context_length=16))
    return NormalisedTransform(tokenizer, size, MEAN, STD, augment=augment)


def reference(data: bytes, size: int, crop: tuple[float, ...] | None = None) -> torch.Tensor:
    """The replaced pipeline, for square images: full decode, one bicubic resize, float
    arithmetic."""
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.width == image.height and image.mode == "L"
    resized = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=crop))
    grey = resized.astype(np.float32) / 255.0
    channels = [(grey - np.float32(m)) / np.float32(s) for m, s in zip(MEAN, STD, strict=True)]
    return torch.from_numpy(np.stack(channels))


def grey_levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| per pixel in grey levels (normalised units times std times 255)."""
    return (a - b).abs() * torch.tensor(STD)[:, None, None] * 255


def subpixel_shift(moved: torch.Tensor, fixed: torch.Tensor) -> np.ndarray:
    """The (dy, dx) that best explains ``moved - fixed`` as a small translation of ``fixed``
    (least squares on its gradient)."""
    fixed64 = fixed[0].numpy().astype(np.float64)
    gy, gx = np.gradient(fixed64)
    difference = moved[0].numpy().astype(np.float64) - fixed64
    design = np.stack([gy.ravel(), gx.ravel()], axis=1)
    return np.linalg.lstsq(design, difference.ravel(), rcond=None)[0]


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_images_under_twice_the_model_size_are_byte_identical(stored, fmt):
    new = transform(40)  # 64 px stored: no reduction, the old resize exactly
    for i, data in enumerate(stored[fmt]):
        assert torch.equal(new.image(data, np.random.default_rng(i)), reference(data, 40)), i


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
@pytest.mark.parametrize("size", [28, 16])
def test_reduced_decode_is_within_tolerance_and_keeps_geometry(stored, fmt, size):
    new = transform(size)
    diffs = []
    for i, data in enumerate(stored[fmt]):
        got, want = new.image(data, np.random.default_rng(i)), reference(data, size)
        assert got.shape == want.shape == (3, size, size) and got.dtype == torch.float32
        # Same place: no translation of even a twentieth of a pixel.
        assert np.abs(subpixel_shift(got, want)).max() < 0.05, i
        diffs.append(grey_levels(got, want))
    levels = torch.stack(diffs)
    assert levels.mean() < MEAN_LEVELS and levels.max() < MAX_LEVELS
    assert levels.max() > 0  # the reduction did happen (else the exact test above covers it)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_augmentation_draws_the_same_box_per_sample(stored, fmt):
    new = transform(28, augment=True)
    for i, data in enumerate(stored[fmt][:6]):
        got = new.image(data, np.random.default_rng([7, i]))
        assert torch.equal(got, new.image(data, np.random.default_rng([7, i])))  # per sample
        box = random_crop_box(STORED, np.random.default_rng([7, i]))  # the replaced draw
        levels = grey_levels(got, reference(data, 28, box))
        assert levels.mean() < MEAN_LEVELS and levels.max() < MAX_LEVELS, i
        other = new.image(data, np.random.default_rng([8, i]))
        assert grey_levels(other, got).mean() > levels.mean()  # another box is further off


def test_jpeg_is_decoded_at_reduced_scale_png_is_not(stored):
    jpeg, png = stored["jpeg"][0], stored["png"][0]
    for min_side, side, factor in [(28, 32, 2.0), (16, 16, 4.0)]:
        image, reduced = decode_scaled(jpeg, min_side)
        assert (image.size, reduced) == ((side, side), factor)
    assert decode_scaled(jpeg, 40)[0].size == decode_scaled(jpeg)[0].size == (64, 64)
    assert decode_scaled(png, 16)[0].size == (64, 64)
    with pytest.raises(UnreadableImage):
        decode_scaled(jpeg[: len(jpeg) // 2], 28)


def test_pixels_stay_uint8_until_the_normalisation(stored):
    loader = SampleTransform(transform(28).tokenizer, 28, MEAN, STD, augment=True)
    for data in stored["png"][:4] + stored["jpeg"][:4]:
        image = loader.image(data, np.random.default_rng(0))
        assert image.dtype == torch.uint8 and image.shape == (3, 28, 28)


def test_device_normalisation_equals_float_arithmetic():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    rgb[0, :3, 0] = [0, 128, 255]
    for pixels in (rgb, rgb[:, :, 1]):
        got = normalize_images(image_to_uint8(Image.fromarray(pixels))[None], MEAN, STD, "cpu")[0]
        array = pixels.astype(np.float32) / 255.0
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        want = (array - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
        assert torch.equal(got, torch.from_numpy(want.transpose(2, 0, 1).copy()))
    corner = normalize_images(image_to_uint8(Image.fromarray(rgb))[None], MEAN, STD, "cpu")
    corner = corner[0, :, 0, :3].flatten().tolist()
    expected = [(v / 255 - MEAN[c]) / STD[c] for c in range(3) for v in rgb[0, :3, c]]
    assert corner == pytest.approx(expected, abs=1e-6)


def test_persistent_workers_draw_each_epochs_randomness(builds):
    dataset = make_dataset(str(builds["png"]), transform(28, augment=True))
    feed = Feed(dataset, len(dataset), 2, 4, GlobalBatchSampler(len(dataset), 4, seed=3))
    workers, images = [], []
    others = {p.pid for p in psutil.Process().children()}
    for epoch in (0, 1, 2):
        batches = list(feed.batches(epoch, 0, 0, workers=1, pin_memory=False))
        workers.append({p.pid for p in psutil.Process().children()} - others)
        # What the main process computes for the epoch, through set_epoch.
        feed.sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        expected = [torch.stack([dataset[i]["image"] for i in b]) for b in feed.sampler]
        assert [b["ids"] for b in batches] == [
            [dataset.records[i]["id"] for i in b] for b in feed.sampler
        ]
        assert all(torch.equal(b["images"], e) for b, e in zip(batches, expected, strict=True))
        images.append(torch.cat(expected))
    assert len(workers[0]) == 1 and workers[0] == workers[1] == workers[2]  # the same worker
    assert not torch.equal(images[0], images[1])  # each epoch's own augmentation
