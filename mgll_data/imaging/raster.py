"""The raster image stage: decode, normalise the pixel mode, resize, encode.

A pure function of one image and the policy, so it runs the same in any worker. Images that
cannot be decoded raise `ItemError` and go to quarantine.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ItemError
from .png import encode_png

# Modes whose samples do not fit in 8 bits; they are rescaled explicitly (Pillow's convert clips).
_WIDE_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
# Images with more pixels are refused from their header, before any decoding. The largest real
# radiographs are about 15 MP (4280 x 3520 detectors); 50 MP leaves room for any of them, while a
# 16-bit image at the limit still decodes in about 100 MB.
DEFAULT_MAX_PIXELS = 50_000_000
_RESCALE_ROWS = 256  # wide images are rescaled this many rows at a time: bounded float memory


@dataclass(frozen=True)
class ImagePolicy:
    """How images are stored: longest side, colour, and encoding."""

    image_size: int = 512
    color: str = "grey"  # "grey" for radiographs, "rgb" for fundus photographs
    format: str = "png"  # "png" or "jpeg"
    jpeg_quality: int = 95
    crop_borders: bool = False  # crop the black background around a fundus disc
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are quarantined (--max-image-pixels)

    @property
    def extension(self) -> str:
        return "png" if self.format == "png" else "jpg"


@dataclass(frozen=True)
class EncodedImage:
    """An image as stored in a record."""

    data: bytes
    extension: str
    width: int
    height: int
    orig_width: int
    orig_height: int


def target_size(width: int, height: int, longest: int) -> tuple[int, int]:
    """Size with the longest side at most `longest`, aspect kept, never upscaled."""
    scale = longest / max(width, height)
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def rescale_to_8bit(image: Image.Image) -> Image.Image:
    """Map a 16-bit, 32-bit or float image linearly onto 0..255 using its own value range."""
    pixels = np.asarray(image)
    low, high = float(pixels.min()), float(pixels.max())
    if high <= low:
        return Image.new("L", image.size, 0)
    out = np.empty(pixels.shape, np.uint8)
    # Row blocks: the same arithmetic per pixel, without a float64 copy of the whole image.
    for top in range(0, pixels.shape[0], _RESCALE_ROWS):
        block = pixels[top : top + _RESCALE_ROWS].astype(np.float64)
        out[top : top + _RESCALE_ROWS] = np.rint((block - low) * (255.0 / (high - low)))
    return Image.fromarray(out, mode="L")


def normalise_mode(image: Image.Image, color: str) -> Image.Image:
    """Bring any mode met in the wild (L, LA, RGB, RGBA, P, 1, I;16, I, F, CMYK) to L or RGB."""
    if image.mode in _WIDE_MODES:
        image = rescale_to_8bit(image)
    target = "L" if color == "grey" else "RGB"
    # convert() drops alpha (LA, RGBA, PA) and resolves palettes (P); grey from RGB uses ITU-R 601.
    return image if image.mode == target else image.convert(target)


def megapixels(pixels: int) -> str:
    """A pixel count in megapixels for messages: 900000000 -> "900", 15065600 -> "15.1",
    384 -> "0.00038"."""
    value = pixels / 1e6
    return f"{round(value, 1):g}" if value >= 1 else f"{value:.2g}"


def check_pixels(width: int, height: int, limit: int, frames: int = 1) -> None:
    """Refuse an image of more than `limit` pixels (all frames) with an ItemError naming both."""
    pixels = width * height * max(1, frames)
    if pixels > limit:
        shape = f"{width}x{height}" + (f" x {frames} frames" if frames > 1 else "")
        raise ItemError(
            "image",
            f"image is {shape} = {megapixels(pixels)} MP, over the {megapixels(limit)} MP "
            "limit (--max-image-pixels)",
        )


@contextmanager
def _own_pixel_limit() -> Iterator[None]:
    """Pillow's decompression-bomb check off while opening: it raises before the size is known,
    and `check_pixels` right after the open (header only) applies the build's own limit."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def open_image(source: str | Path | bytes | BinaryIO) -> Image.Image:
    """Open an image (header only) from a path, bytes or a binary file; missing or unreadable
    input raises ItemError."""
    try:
        with _own_pixel_limit():
            if isinstance(source, bytes):
                return Image.open(io.BytesIO(source))
            return Image.open(source)
    except FileNotFoundError as err:
        raise ItemError("image", f"missing image file: {source}") from err
    except UnidentifiedImageError as err:
        # Pillow's message names the file object (`<_io.BufferedReader name=4>`): not a reason.
        raise ItemError("image", "not a readable image (no image format recognised)") from err
    except (OSError, ValueError) as err:
        raise ItemError("image", f"not a readable image ({err})") from err


def process_image(source: str | Path | bytes | BinaryIO, policy: ImagePolicy) -> EncodedImage:
    """Decode, normalise, resize and encode one image according to `policy`.

    The size is checked against `policy.max_pixels` from the header, before decoding.
    """
    image = open_image(source)
    with image:
        check_pixels(image.width, image.height, policy.max_pixels)
        orig_width, orig_height = image.size
        size = target_size(orig_width, orig_height, policy.image_size)
        if policy.crop_borders:
            # The crop may keep only the central square: decode big enough for that too.
            scale = min(1.0, policy.image_size / min(orig_width, orig_height))
            size = (round(orig_width * scale), round(orig_height * scale))
        if image.format == "JPEG" and size != image.size:
            # Let libjpeg decode at a reduced scale (1/2, 1/4, 1/8) that is still >= the target.
            image.draft("L" if policy.color == "grey" else "RGB", size)
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, zlib.error) as err:
            raise ItemError("image", f"corrupt or truncated image ({err})") from err
        except Image.DecompressionBombError as err:  # a frame or tile larger than the header
            raise ItemError("image", f"decompression bomb ({err})") from err
        pixels = normalise_mode(image, policy.color)
    if policy.crop_borders:
        pixels = crop_black_borders(pixels)
        # Sizes now refer to the cropped region, in source pixels.
        scale = orig_width / image.size[0]
        orig_width, orig_height = round(pixels.width * scale), round(pixels.height * scale)
    return resize_and_encode(pixels, (orig_width, orig_height), policy)


def crop_black_borders(image: Image.Image, threshold: int = 15) -> Image.Image:
    """Crop the black background around a fundus photograph's disc (or any dark frame).

    Rows and columns where fewer than 1 % of the pixels are brighter than `threshold` count as
    background; the result is the bounding box of the rest. An image that is all background is
    returned unchanged.
    """
    grey = np.asarray(image if image.mode == "L" else image.convert("L"))
    step = max(1, min(grey.shape) // 512)  # a strided view is plenty to find the disc
    bright = grey[::step, ::step] > threshold
    rows = np.flatnonzero(bright.mean(axis=1) > 0.01)
    cols = np.flatnonzero(bright.mean(axis=0) > 0.01)
    if rows.size == 0 or cols.size == 0:
        return image
    box = (
        int(cols[0] * step),
        int(rows[0] * step),
        int(min(image.width, (cols[-1] + 1) * step)),
        int(min(image.height, (rows[-1] + 1) * step)),
    )
    return image if box == (0, 0, image.width, image.height) else image.crop(box)


def resize_and_encode(
    pixels: Image.Image, orig_size: tuple[int, int], policy: ImagePolicy
) -> EncodedImage:
    """Resize decoded pixels (possibly draft-reduced) of a source of `orig_size`, and encode."""
    size = target_size(orig_size[0], orig_size[1], policy.image_size)
    if pixels.size != size:
        # Box-average by the largest integer factor first (exact area averaging, cheap), then
        # an antialiased bicubic for the remaining < 2x step: 0.9 + 1.6 ms where a Lanczos over
        # the whole range costs 20 ms (measured on 2048 px radiographs, benchmarks/).
        pixels = pixels.resize(size, Image.Resampling.BICUBIC, reducing_gap=1.0)
    return EncodedImage(
        data=encode(pixels, policy),
        extension=policy.extension,
        width=pixels.width,
        height=pixels.height,
        orig_width=orig_size[0],
        orig_height=orig_size[1],
    )


def encode(image: Image.Image, policy: ImagePolicy) -> bytes:
    """Encode deterministically (no timestamps or other varying chunks)."""
    if policy.format == "png":
        return encode_png(np.asarray(image))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=policy.jpeg_quality)
    return buffer.getvalue()
