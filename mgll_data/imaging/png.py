"""A fast PNG encoder for 8-bit grey and RGB images.

Pillow's encoder tries all five PNG row filters on every row, which costs about three times
what zlib itself does at the sizes stored here (measured: 6.4 ms against 2.3 ms for a 508 x 512
radiograph). Radiographs are smooth vertically, so the single `Up` filter followed by zlib's RLE
strategy compresses them within a few percent of Pillow's output. Any PNG reader decodes the
result; tests check the round trip through Pillow.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPE = {1: 0, 3: 2}  # channels -> PNG colour type (grey, truecolour)
_FILTER_UP = 2


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(pixels: np.ndarray) -> bytes:
    """Encode a uint8 array of shape (H, W) or (H, W, 3) as PNG, deterministically."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(
            f"expected uint8 (H, W) or (H, W, 3) pixels, got {pixels.dtype} {pixels.shape}"
        )
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    lines = np.ascontiguousarray(pixels).reshape(height, width * channels)
    filtered = np.empty((height, lines.shape[1] + 1), np.uint8)
    filtered[:, 0] = _FILTER_UP
    filtered[0, 1:] = lines[0]  # the row above the first row is zero
    np.subtract(lines[1:], lines[:-1], out=filtered[1:, 1:])  # wraps modulo 256, as PNG wants
    compressor = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    idat = compressor.compress(filtered.tobytes()) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPE[channels], 0, 0, 0)
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
