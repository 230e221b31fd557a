"""The Xet storage formats that the fake Hub (tests/fake_hub.py) reads back from uploads.

Decoders for LZ4 frames and blocks, byte grouping, the chunks of a xorb and the file info
section of an MDB shard, the hash notation of CAS API paths, and CRC-64/NVME (the checksum a
xorb upload grant states). Standard library only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


def xet_hash_hex(raw: bytes) -> str:
    """A 32-byte Xet hash as API paths write it: four little-endian u64 words, in hex."""
    return "".join(raw[i : i + 8][::-1].hex() for i in range(0, 32, 8))


def _lz4_block(src: bytes, out: bytearray) -> None:
    """Decode one raw LZ4 block onto `out` (which holds any earlier output as history)."""
    i, end = 0, len(src)

    def length(value: int) -> int:
        nonlocal i
        if value == 15:
            while True:
                extra = src[i]
                i += 1
                value += extra
                if extra != 255:
                    break
        return value

    while i < end:
        token = src[i]
        i += 1
        literals = length(token >> 4)
        out += src[i : i + literals]
        i += literals
        if i >= end:  # the last sequence has literals only
            break
        offset = src[i] | src[i + 1] << 8
        i += 2
        if not 0 < offset <= len(out):
            raise ValueError(f"LZ4 match offset {offset} outside the output")
        remaining = length(token & 15) + 4
        start = len(out) - offset
        while remaining:  # an overlapping match repeats the last `offset` bytes
            piece = out[start : start + min(remaining, offset)]
            out += piece
            start += len(piece)
            remaining -= len(piece)


def lz4_decompress(src: bytes) -> bytes:
    """An LZ4 frame (magic 04 22 4D 18) or a raw LZ4 block, decoded."""
    out = bytearray()
    if src[:4] != b"\x04\x22\x4d\x18":
        _lz4_block(src, out)
        return bytes(out)
    flags, i = src[4], 6  # FLG, BD
    i += (8 if flags & 0x08 else 0) + (4 if flags & 0x01 else 0) + 1  # size, dict id, HC
    while True:
        size = int.from_bytes(src[i : i + 4], "little")
        i += 4
        if size == 0:  # end mark
            return bytes(out)
        block = src[i : i + (size & 0x7FFFFFFF)]
        i += len(block) + (4 if flags & 0x10 else 0)  # block checksum
        if size & 0x80000000:
            out += block
        else:
            _lz4_block(block, out)


def bg4_ungroup(grouped: bytes) -> bytes:
    """Undo byte grouping: group k holds bytes k, k+4, k+8, ... of the chunk, in order."""
    n, out, pos = len(grouped), bytearray(len(grouped)), 0
    for k in range(4):
        size = n // 4 + (k < n % 4)
        out[k::4] = grouped[pos : pos + size]
        pos += size
    return bytes(out)


def xorb_chunks(xorb: bytes) -> list[bytes]:
    """The decompressed chunks of a serialized xorb (a trailing xorb footer is ignored)."""
    chunks, i = [], 0
    while i < len(xorb) and xorb[i] == 0:  # chunk header version 0; a footer starts otherwise
        if i + 8 > len(xorb):
            raise ValueError("xorb ends inside a chunk header")
        size = int.from_bytes(xorb[i + 1 : i + 4], "little")
        scheme = xorb[i + 4]
        unpacked = int.from_bytes(xorb[i + 5 : i + 8], "little")
        data = xorb[i + 8 : i + 8 + size]
        if len(data) != size:
            raise ValueError("xorb ends inside a chunk")
        i += 8 + size
        if scheme == 0:
            raw = data
        elif scheme == 1:
            raw = lz4_decompress(data)
        elif scheme == 2:
            raw = bg4_ungroup(lz4_decompress(data))
        else:
            raise ValueError(f"unknown chunk compression scheme {scheme}")
        if len(raw) != unpacked:
            raise ValueError(f"chunk {len(chunks)} unpacks to {len(raw)} bytes, not {unpacked}")
        chunks.append(raw)
    if not chunks:
        raise ValueError("no chunks in the xorb")
    return chunks


@dataclass
class ShardFile:
    """One file of a shard's file info section."""

    file_hash: str
    terms: list[tuple[str, int, int, int]]  # xorb hash, unpacked bytes, chunk start, chunk end
    sha256: bytes | None


def parse_shard(data: bytes) -> list[ShardFile]:
    """The file info section of an MDB shard (header version 2)."""
    if len(data) < 48 or struct.unpack_from("<Q", data, 32)[0] != 2:
        raise ValueError("not an MDB shard of header version 2")
    files, i = [], 48
    while True:
        if i + 48 > len(data):
            raise ValueError("shard ends before the file info bookend")
        head = data[i : i + 48]
        i += 48
        if head[:32] == b"\xff" * 32:
            return files
        flags, count = struct.unpack_from("<II", head, 32)
        terms = []
        for _ in range(count):
            _, unpacked, start, end = struct.unpack_from("<IIII", data, i + 32)
            terms.append((xet_hash_hex(data[i : i + 32]), unpacked, start, end))
            i += 48
        if flags & 1 << 31:  # verification entries
            i += 48 * count
        sha256 = None
        if flags & 1 << 30:  # metadata extension
            sha256 = data[i : i + 32]
            i += 48
        files.append(ShardFile(xet_hash_hex(head[:32]), terms, sha256))


def _crc64_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = crc >> 1 ^ (0x9A6C9329AC4BC9B5 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC64 = _crc64_table()


def crc64_nvme(data: bytes) -> int:
    """CRC-64/NVME (reflected 0xAD93D23594C93659, init and xorout all ones)."""
    crc = 0xFFFFFFFFFFFFFFFF
    for byte in data:
        crc = _CRC64[(crc ^ byte) & 0xFF] ^ crc >> 8
    return crc ^ 0xFFFFFFFFFFFFFFFF
