"""The raster image stage: every pixel mode met in the wild, resizing, encoding, bad files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mgll_data.errors import ItemError
from mgll_data.imaging.raster import ImagePolicy, process_image, target_size


def _encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


GREY = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (40, 1))  # 40 x 64 ramp


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "1"])
def test_every_8bit_mode_becomes_grey(mode):
    source = Image.fromarray(GREY, "L").convert(mode)
    out = process_image(_encoded(source), ImagePolicy(image_size=512))
    image = _decode(out.data)
    assert image.mode == "L" and image.size == (64, 40)
    assert (out.width, out.height, out.orig_width, out.orig_height) == (64, 40, 64, 40)
    if mode != "1":  # grey content survives (P quantises, so allow a small error)
        assert np.abs(np.asarray(image, np.int16) - GREY).max() <= 4


def test_16bit_is_rescaled_not_clipped():
    ramp = (np.tile(np.arange(64, dtype=np.uint16), (8, 1)) * 64).astype(np.uint16)  # 0..4032
    out = process_image(_encoded(Image.fromarray(ramp)), ImagePolicy())
    pixels = np.asarray(_decode(out.data))
    assert pixels.min() == 0 and pixels.max() == 255  # Pillow's convert would clip all to 255
    assert len(np.unique(pixels)) == 64  # the ramp keeps its steps


def test_rgb_policy_keeps_colour():
    rgb = np.zeros((10, 20, 3), np.uint8)
    rgb[..., 0] = 200
    for mode in ("RGB", "RGBA", "P", "L"):
        out = process_image(_encoded(Image.fromarray(rgb).convert(mode)), ImagePolicy(color="rgb"))
        assert _decode(out.data).mode == "RGB"


def test_resize_keeps_aspect_and_never_upscales():
    assert target_size(2000, 1000, 512) == (512, 256)
    assert target_size(1000, 2500, 512) == (205, 512)
    assert target_size(300, 200, 512) == (300, 200)
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1000, 2000), np.uint8))
    out = process_image(_encoded(big), ImagePolicy(image_size=256))
    assert _decode(out.data).size == (256, 128) and (out.orig_width, out.orig_height) == (
        2000,
        1000,
    )


def test_jpeg_draft_decoding_and_jpeg_output():
    rng = np.random.default_rng(1)
    big = Image.fromarray(rng.integers(0, 255, (1600, 2000), np.uint8))
    out = process_image(_encoded(big, "JPEG"), ImagePolicy(image_size=300, format="jpeg"))
    image = _decode(out.data)
    assert image.format == "JPEG" and image.size == (300, 240) and out.extension == "jpg"
    assert (out.orig_width, out.orig_height) == (2000, 1600)  # the header size, not the draft's


def test_encoding_is_deterministic():
    source = _encoded(Image.fromarray(GREY))
    assert process_image(source, ImagePolicy()).data == process_image(source, ImagePolicy()).data


def test_bad_files_raise_item_errors(tmp_path):
    data = _encoded(Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64), np.uint8)))
    with pytest.raises(ItemError, match="corrupt or truncated"):
        process_image(data[: len(data) // 2], ImagePolicy())
    with pytest.raises(ItemError, match="not a readable image"):
        process_image(b"not an image at all", ImagePolicy())
    with pytest.raises(ItemError, match="missing image file"):
        process_image(str(tmp_path / "absent.png"), ImagePolicy())


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (40, 64), (33, 17, 3)])
def test_fast_png_round_trips_through_pillow(shape):
    from mgll_data.imaging.png import encode_png

    pixels = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    image = _decode(encode_png(pixels))
    assert image.format == "PNG" and image.mode == ("L" if len(shape) == 2 else "RGB")
    assert np.array_equal(np.asarray(image), pixels)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(pixels.astype(np.uint16))


def test_crop_borders_keeps_the_fundus_disc():
    yy, xx = np.mgrid[0:300, 0:400]
    disc = ((xx - 200) ** 2 + (yy - 150) ** 2) < 120**2  # a 240 px disc on a black frame
    rgb = np.zeros((300, 400, 3), np.uint8)
    rgb[disc] = (180, 90, 40)
    source = _encoded(Image.fromarray(rgb), "JPEG")
    out = process_image(source, ImagePolicy(image_size=120, color="rgb", crop_borders=True))
    image = _decode(out.data)
    assert image.mode == "RGB" and abs(image.width - image.height) <= 4  # the disc's square
    assert max(image.size) == 120
    assert 230 <= out.orig_width <= 250  # the cropped region, in source pixels
    plain = process_image(source, ImagePolicy(image_size=120, color="rgb"))
    assert (plain.width, plain.height) == (120, 90)
    black = _encoded(Image.new("RGB", (50, 40)))
    assert process_image(black, ImagePolicy(color="rgb", crop_borders=True)).width == 50
