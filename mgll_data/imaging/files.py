"""Opening a release's image files safely: only regular files that lie inside the release.

A release is untrusted input. A FIFO named like an image would block a plain `open()` forever, a
device such as `/dev/zero` never ends, and a symlink may point anywhere on the machine. Every
image file a build reads is opened here: without blocking (`O_NONBLOCK`), then checked with
`fstat` on the open descriptor (so a file swapped after a check is still caught), and, when the
release root is known, resolved and refused if it leaves the root. Symlinks that stay inside
the release are followed (mirrors de-duplicate files that way). Refusals raise `ItemError`, so
the item goes to quarantine with the reason and the build goes on.

A release on object storage (`s3://`, `gs://`, `hf://`) has no links, FIFOs or devices; there
an image is refused when its URL leaves the release root, when it is not a file, and when the
listing states more than `MAX_REMOTE_FILE_BYTES`, before a byte of it is read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from ..errors import ItemError
from ..storage import filesystem, folder_path, inside_root, is_url

# No radiograph file comes near this (a 4280 x 3520 16-bit DICOM is about 35 MB); the same cap
# as one archive member (`sources/archives.py`).
MAX_REMOTE_FILE_BYTES = 256 * 2**20

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words ("a FIFO", "a socket", ...)."""
    return next((name for test, name in _KINDS if test(mode)), "not a plain file")


def outside_root(path: str | Path, root: str | Path) -> str | None:
    """Why `path` is outside `root` once symlinks are resolved, or None when it is inside."""
    base = os.path.realpath(root)
    if _inside(os.path.realpath(path), base):
        return None
    if _inside(os.path.abspath(path), os.path.abspath(root)):
        return "symlink leaves the release folder"
    return "path leaves the release folder"


def _inside(path: str, base: str) -> bool:
    return os.path.commonpath([path, base]) == base


def open_release_file(
    path: str | Path,
    root: str | Path | None = None,
    *,
    what: str = "image file",
    options: dict | None = None,
    max_bytes: int | None = None,
) -> BinaryIO:
    """Open `path` for binary reading if it is a regular file (inside `root` when given).

    Raises ItemError("image", reason): `missing {what}: PATH` (relative to `root`), `symlink
    leaves the release folder`, `not a regular file (a FIFO)` and the like. A path on object
    storage (a URL, or a UPath that carries its file system) is checked as `read_remote_file`
    says and opened as a seekable fsspec file; `options` build the file system of a plain URL,
    and `max_bytes` refuses a remote file whose listed size is larger.
    """
    if is_url(path) or (root is not None and is_url(root)):
        return _open_remote(path, root, what, options, max_bytes)
    if root is not None:
        reason = outside_root(path, root)
        if reason is not None:
            raise ItemError("image", reason)
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as err:
        # Relative to the release: the reason names no local folder (outputs must not).
        shown = os.path.relpath(path, root) if root is not None else path
        raise ItemError("image", f"missing {what}: {shown}") from err
    except OSError as err:
        mode = _mode(path)  # a socket cannot be opened at all (ENXIO): say what it is
        if mode is not None and not stat.S_ISREG(mode):
            raise ItemError("image", f"not a regular file ({file_kind(mode)})") from err
        raise ItemError("image", f"cannot open {what} ({err.strerror})") from err
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ItemError("image", f"not a regular file ({file_kind(mode)})")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _open_remote(
    path: str | Path,
    root: str | Path | None,
    what: str,
    options: dict | None,
    max_bytes: int | None,
) -> BinaryIO:
    url = str(path)
    base = None if root is None else str(root)
    if base is not None and not inside_root(url, base):
        raise ItemError("image", "path leaves the release folder")
    # A UPath brings its file system (options included), and so does a root that is one; a
    # plain URL with a plain root (a task's image path on a worker) gets the build's options.
    if not hasattr(path, "fs") and hasattr(root, "fs"):
        path = folder_path(root, url)
    fs, fs_path = (path.fs, path.path) if hasattr(path, "fs") else filesystem(url, options)
    try:
        info = fs.info(fs_path)
    except FileNotFoundError as err:
        shown = url[len(base.rstrip("/")) + 1 :] if base is not None else url
        raise ItemError("image", f"missing {what}: {shown}") from err
    except Exception as err:  # noqa: BLE001 - storage clients raise their own kinds
        raise ItemError("image", f"cannot open {what} ({type(err).__name__})") from err
    if info.get("type") != "file":
        raise ItemError("image", f"not a regular file ({info.get('type') or 'unknown kind'})")
    size = int(info.get("size") or 0)
    if max_bytes is not None and size > max_bytes:
        raise ItemError("image", f"{what} is {size:,} bytes, over the {max_bytes:,}-byte cap")
    try:
        return fs.open(fs_path, "rb")
    except OSError as err:
        raise ItemError("image", f"cannot read {what} ({type(err).__name__})") from err


def _mode(path: str | Path) -> int | None:
    try:
        return os.stat(path).st_mode
    except OSError:
        return None


def read_remote_file(
    url: str,
    root: str | None,
    options: dict | None = None,
    *,
    what: str = "image file",
    max_bytes: int = MAX_REMOTE_FILE_BYTES,
) -> bytes:
    """The bytes of a file on object storage, refused (ItemError) when its URL leaves `root`,
    it is missing or not a file, or its stated size is over `max_bytes`; a file that then
    produces more than it stated is refused too."""
    with open_release_file(url, root, what=what, options=options, max_bytes=max_bytes) as file:
        try:
            data = file.read(max_bytes + 1)
        except OSError as err:
            raise ItemError("image", f"cannot read {what} ({type(err).__name__})") from err
    if len(data) > max_bytes:
        raise ItemError("image", f"{what} produced more than the {max_bytes:,}-byte cap")
    return data
