"""Segmentation masks: run-length codes, boxes, ellipses and polygons rasterised, then resized
with the image.

A source describes an image's regions compactly (`MaskSpec`: runs or shapes, in pixels of a
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
    (column-major, as the SIIM-ACR encoding counts); `boxes` are (x, y, w, h); `ellipses` are
    the axis-aligned ellipses inscribed in bounding boxes (x1, y1, x2, y2); `polygons` are
    closed outlines of (x, y) vertices. A spec with none of them is an empty mask: the release
    asserts the image has no region.
    """

    frame: tuple[int, int] | None = None  # None: the decoded source image's size
    runs: tuple[tuple[int, int], ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    ellipses: tuple[tuple[float, float, float, float], ...] = ()
    polygons: tuple[tuple[tuple[float, float], ...], ...] = ()


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
    for box in spec.ellipses:
        mask[_inside_ellipse(box, width, height)] = MASK_ON
    for vertices in spec.polygons:
        mask[_inside_polygon(vertices, width, height)] = MASK_ON
    return mask


def _centre_span(start: float, size: float, limit: int) -> tuple[int, int]:
    """The pixel indices p with start <= p + 0.5 < start + size, as a clipped half-open range."""
    first = int(np.ceil(start - 0.5))
    stop = int(np.ceil(start + size - 0.5))
    return max(0, first), min(limit, max(0, stop))


def _inside_ellipse(box: tuple[float, float, float, float], width: int, height: int) -> np.ndarray:
    """Pixels whose centre lies in the ellipse inscribed in `box` (x1, y1, x2, y2), its edge
    included; a box of no area holds none."""
    x1, y1, x2, y2 = box
    inside = np.zeros((height, width), bool)
    half_w, half_h = (x2 - x1) / 2, (y2 - y1) / 2
    if half_w <= 0 or half_h <= 0:
        return inside
    # Only the centres within the box can be inside: work on that window of a large image.
    left, right = _centre_window(x1, x2, width)
    top, bottom = _centre_window(y1, y2, height)
    dx = (np.arange(left, right) + 0.5 - (x1 + x2) / 2) / half_w
    dy = (np.arange(top, bottom) + 0.5 - (y1 + y2) / 2) / half_h
    inside[top:bottom, left:right] = dy[:, None] ** 2 + dx[None, :] ** 2 <= 1.0
    return inside


def _centre_window(start: float, stop: float, limit: int) -> tuple[int, int]:
    """The pixel indices p with start <= p + 0.5 <= stop, as a clipped half-open range."""
    first = min(limit, max(0, int(np.ceil(start - 0.5))))
    return first, max(first, min(limit, int(np.floor(stop - 0.5)) + 1))


def _inside_polygon(
    vertices: tuple[tuple[float, float], ...], width: int, height: int
) -> np.ndarray:
    """Pixels whose centre lies inside the closed outline, by the even-odd rule.

    An edge counts for a row of centres when one end is at or above it and the other below
    (half-open in y, so a vertex on the row is counted once), and it flips every centre left of
    where it crosses the row: a centre exactly on a vertical edge is in on the edge's right
    side only, as a box's half-open span is.
    """
    inside = np.zeros((height, width), bool)
    points = np.asarray(vertices, float)
    if len(points) < 3:
        return inside
    ys = np.arange(height) + 0.5
    xs = np.arange(width) + 0.5
    for (xa, ya), (xb, yb) in zip(points, np.roll(points, -1, axis=0), strict=True):
        if ya == yb:
            continue  # a horizontal edge crosses no row of centres
        rows = (np.minimum(ya, yb) <= ys) & (ys < np.maximum(ya, yb))
        crossing = xa + (ys[rows] - ya) * (xb - xa) / (yb - ya)
        inside[rows] ^= xs[None, :] < crossing[:, None]
    return inside


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
