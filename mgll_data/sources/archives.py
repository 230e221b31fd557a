"""Reading zip archives from a release with bounded memory: size and ratio caps, streaming.

A downloaded zip is untrusted: a member may declare (or, with a lying header, produce) gigabytes
from a few kilobytes, and zips may nest. Here every member is checked before it is opened: its
declared size against `ZipLimits.max_member_bytes`, its declared compression ratio against
`max_ratio`; while it is read the bytes actually produced are counted against the same cap.
A nested zip is spooled to a temporary file under the same caps (so only its directory is held
in memory) and walked to at most `max_depth` levels. A member over a cap raises `MemberError`
with a reason that names no member (member names may carry PHI), and the caller quarantines it.
macOS clutter (`__MACOSX/`, AppleDouble `._x`, `.DS_Store`) is never listed.
"""

from __future__ import annotations

import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

from .toolkit import is_hidden

_CHUNK = 1 << 20
_MIB = 2**20
# Errors reading a damaged member: bad headers or CRC, truncated or invalid deflate data,
# unsupported compression (NotImplementedError) and encryption (RuntimeError).
READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError)


@dataclass(frozen=True)
class ZipLimits:
    """Caps for one member. A chest radiograph DICOM is at most about 35 MB (4280 x 3520 x 16
    bit), and deflate shrinks one by 2-5x; a zip bomb's members expand about 1000x."""

    max_member_bytes: int = 256 * _MIB
    max_ratio: float = 100.0
    ratio_from_bytes: int = _MIB  # smaller members cannot hurt, whatever their ratio
    max_depth: int = 4  # nested zips below the top-level one


class MemberError(Exception):
    """A member that is refused (over a cap) or unreadable; `reason` says which, without names."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def is_clutter(name: str) -> bool:
    """A member under `__MACOSX/` or named like a dot file (`._x.dcm`, `.DS_Store`)."""
    return any(is_hidden(part) for part in name.split("/") if part)


def members(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The archive's files in name order, without folders and macOS clutter."""
    infos = [i for i in archive.infolist() if not i.is_dir() and not is_clutter(i.filename)]
    return sorted(infos, key=lambda i: i.filename)


def check_member(info: zipfile.ZipInfo, limits: ZipLimits) -> None:
    """Refuse a member from its declared sizes alone (MemberError), before it is opened."""
    size, packed = info.file_size, max(info.compress_size, 1)
    if size > limits.max_member_bytes:
        raise MemberError(
            f"zip member declares {_mib(size)}, over the {_mib(limits.max_member_bytes)} cap"
        )
    if size >= limits.ratio_from_bytes and size / packed > limits.max_ratio:
        raise MemberError(
            f"zip member expands {size / packed:.0f}x ({_mib(packed)} to {_mib(size)}), over "
            f"the {limits.max_ratio:g}x ratio cap (a zip bomb?)"
        )


@contextmanager
def open_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ZipLimits
) -> Iterator[IO[bytes]]:
    """A checked member as a stream. zipfile never yields more than the declared size, which
    `check_member` capped, so a reader of this stream is bounded too."""
    check_member(info, limits)
    try:
        with archive.open(info) as stream:
            yield stream
    except READ_ERRORS as err:
        raise MemberError(f"zip member unreadable ({_anonymous(err, info)})") from err


def copy_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ZipLimits, out: IO[bytes]
) -> None:
    """Copy a checked member to `out` in chunks, counting the bytes actually produced."""
    with open_member(archive, info, limits) as stream:
        total = 0
        try:
            while chunk := stream.read(_CHUNK):
                total += len(chunk)
                if total > limits.max_member_bytes:
                    raise MemberError(
                        f"zip member produced over {_mib(limits.max_member_bytes)} "
                        "(more than it declares)"
                    )
                out.write(chunk)
        except READ_ERRORS as err:
            raise MemberError(f"zip member unreadable ({_anonymous(err, info)})") from err


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ZipLimits) -> bytes:
    """A checked member's bytes (at most `limits.max_member_bytes`)."""
    with tempfile.SpooledTemporaryFile(max_size=limits.max_member_bytes + 1) as buffer:
        copy_member(archive, info, limits, buffer)
        buffer.seek(0)
        return buffer.read()


@contextmanager
def open_nested(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ZipLimits
) -> Iterator[zipfile.ZipFile]:
    """A zip inside `archive`, spooled to a temporary file (memory holds only its directory)."""
    with tempfile.SpooledTemporaryFile(max_size=8 * _MIB) as spool:
        copy_member(archive, info, limits, spool)
        spool.seek(0)
        try:
            inner = zipfile.ZipFile(spool)
        except READ_ERRORS as err:
            raise MemberError(f"nested zip unreadable ({_anonymous(err, info)})") from err
        with inner:
            yield inner


@dataclass(frozen=True)
class Entry:
    """A member found by `walk`: its chain of names (outer to inner), and either the open
    archive that holds it (`archive`, `info`) or the reason it could not be walked."""

    chain: tuple[str, ...]
    archive: zipfile.ZipFile | None = None
    info: zipfile.ZipInfo | None = None
    error: str | None = None


def walk(
    archive: zipfile.ZipFile, limits: ZipLimits, prefix: tuple[str, ...] = (), depth: int = 0
) -> Iterator[Entry]:
    """Every non-zip member, nested zips searched under the same caps, in name order.

    An `Entry` is valid while the walk is suspended on it (a nested archive is closed when the
    walk moves past it). Nested zips over a cap, unreadable or deeper than `limits.max_depth`
    yield an `Entry` with `error` instead.
    """
    for info in members(archive):
        chain = (*prefix, info.filename)
        if not info.filename.lower().endswith(".zip"):
            yield Entry(chain, archive, info)
            continue
        if depth >= limits.max_depth:
            yield Entry(chain, error=f"zip nested deeper than {limits.max_depth} levels")
            continue
        try:
            with open_nested(archive, info, limits) as inner:
                yield from walk(inner, limits, chain, depth + 1)
        except MemberError as err:
            yield Entry(chain, error=err.reason)


def read_chain(archive: zipfile.ZipFile, chain: tuple[str, ...], limits: ZipLimits) -> bytes:
    """The bytes of the member named by `chain` (nested zips opened on the way), under the caps.

    Raises MemberError for a member over a cap, a missing name or a damaged archive.
    """
    try:
        info = archive.getinfo(chain[0])
    except KeyError as err:
        raise MemberError("zip member missing (the archive changed since the scan)") from err
    if len(chain) == 1:
        return read_member(archive, info, limits)
    with open_nested(archive, info, limits) as inner:
        return read_chain(inner, chain[1:], limits)


def _mib(size: int) -> str:
    return f"{size / _MIB:.1f} MiB" if size < 1024 * _MIB else f"{size / 1024 / _MIB:.1f} GiB"


def _anonymous(err: BaseException, info: zipfile.ZipInfo) -> str:
    """An error message with the member's name (which may carry PHI) left out."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text.replace(repr(info.filename), "(name withheld)").replace(info.filename, "…")
