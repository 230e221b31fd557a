"""Segmentation masks: run-length codes and boxes rasterised, then resized with the image.

A source describes an image's regions compactly (`MaskSpec`: runs or boxes, in pixels of a
frame); the record stage rasterises them in the worker and resizes the mask to the stored image
with nearest-neighbour sampling. The image stage maps the whole source frame onto the whole stored
image (`imaging/raster.py`: resize only, no padding or cropping), and boxes are rescaled the same
way (`build/stages.py`, `rescale_boxes`), so a mask pixel is on exactly when the centre of the
stored pixel, mapped back to the frame, falls in a region.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .png import encode_png

MASK_ON = 255  # stored masks are 0/255 so that they are visible as images


@dataclass(frozen=True)
class MaskSpec:
    """The regions of one image's mask, in pixels of `frame` (width, height).

    `runs` are (start, length) pairs of absolute offsets into the frame counted down columns
    (column-major, as the SIIM-ACR encoding counts); `boxes` are (x, y, w, h). A spec with
    neither is an empty mask: the release asserts the image has no region.
    """

    frame: tuple[int, int] | None = None  # None: the decoded source image's size
    runs: tuple[tuple[int, int], ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()


def parse_siim_rle(text: str, frame: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """One `EncodedPixels` cell of SIIM-ACR's `train-rle.csv` as absolute column-major runs.

    `-1` is an image without pneumothorax (no runs). Otherwise the cell holds pairs
    (offset from the end of the previous run, length). Raises ValueError naming what is wrong:
    a token that is not an integer, an odd count, a negative offset, an empty run, or a run
    past the end of the frame.
    """
    tokens = text.split()
    if tokens == ["-1"]:
        return ()
    if not tokens:
        raise ValueError("empty EncodedPixels (expected -1 or offset/length pairs)")
    try:
        values = [int(t) for t in tokens]
    except ValueError:
        bad = next(t for t in tokens if not t.lstrip("-").isdigit())
        raise ValueError(f"EncodedPixels token {bad[:20]!r} is not an integer") from None
    if len(values) % 2:
        raise ValueError(f"EncodedPixels has {len(values)} numbers, expected offset/length pairs")
    total = frame[0] * frame[1]
    runs = []
    end = 0
    for k in range(0, len(values), 2):
        offset, length = values[k], values[k + 1]
        if offset < 0 or length < 1:
            raise ValueError(f"EncodedPixels pair {k // 2 + 1} ({offset} {length}) is invalid")
        start = end + offset
        end = start + length
        if end > total:
            raise ValueError(
                f"EncodedPixels run {k // 2 + 1} ends at pixel {end}, past the "
                f"{frame[0]}x{frame[1]} frame"
            )
        runs.append((start, length))
    return tuple(runs)


def rasterise(spec: MaskSpec, frame: tuple[int, int]) -> np.ndarray:
    """The mask of `spec` as a (height, width) uint8 array of 0 and `MASK_ON`."""
    width, height = frame
    by_column = np.zeros(width * height, np.uint8)
    for start, length in spec.runs:
        by_column[start : start + length] = MASK_ON
    mask = np.ascontiguousarray(by_column.reshape(width, height).T)  # columns -> rows
    for x, y, w, h in spec.boxes:
        # A pixel is inside when its centre is: the rule the rescaled box obeys too.
        left, right = _centre_span(x, w, width)
        top, bottom = _centre_span(y, h, height)
        mask[top:bottom, left:right] = MASK_ON
    return mask


def _centre_span(start: float, size: float, limit: int) -> tuple[int, int]:
    """The pixel indices p with start <= p + 0.5 < start + size, as a clipped half-open range."""
    first = int(np.ceil(start - 0.5))
    stop = int(np.ceil(start + size - 0.5))
    return max(0, first), min(limit, max(0, stop))


def resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`mask` at `size` (width, height): each stored pixel takes the frame pixel under its centre.

    Stored pixel i samples frame pixel floor((i + 0.5) * frame / stored), in exact integer
    arithmetic (Pillow's NEAREST rounds some ties the other way at non-integer scales).
    """
    height, width = mask.shape
    rows = ((2 * np.arange(size[1]) + 1) * height) // (2 * size[1])
    cols = ((2 * np.arange(size[0]) + 1) * width) // (2 * size[0])
    return mask[np.ix_(rows, cols)]


def render_mask(
    spec: MaskSpec, source_size: tuple[int, int], stored_size: tuple[int, int]
) -> bytes:
    """The stored mask: rasterised in its frame, resized nearest-neighbour, encoded as PNG."""
    frame = spec.frame or source_size
    return encode_png(resize_nearest(rasterise(spec, frame), stored_size))
