"""Helpers every release reader shares: walking a release, finding its files, reading its values.

Releases arrive unzipped on any system, so walks skip what macOS and archivers leave behind
(dot files such as `.DS_Store`, AppleDouble twins `._x.jpg`, the `__MACOSX/` folder) and visit
folders in sorted order, so a scan does not depend on the file system's listing order.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..storage import child, is_url, relative_parts, relative_text, walk_url

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
# A loose file name may carry a prefix before the wanted name (`a. RFMiD_Training_Labels.csv`)
# when it ends in one of these.
_PREFIX_ENDS = " ._-"
_AGE = re.compile(r"(\d+)\s*([DWMY]?)", re.IGNORECASE)
_UNITS_PER_YEAR = {"": 1.0, "Y": 1.0, "M": 12.0, "W": 52.18, "D": 365.25}
MAX_AGE_YEARS = 120.0


# --- walking a release ---------------------------------------------------------------------


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is system clutter: dot names (`.DS_Store`, `._x`) or
    macOS's `__MACOSX` resource-fork folder."""
    return name.startswith(".") or name == "__MACOSX"


def walk_release(
    root: Path | str,
    *,
    max_depth: int | None = None,
    skip_dir: Callable[[Path], bool] | None = None,
) -> Iterator[tuple[str, list[str], list[str]]]:
    """`os.walk(root)` top-down with hidden entries pruned and names sorted.

    Yields (folder, subfolder names, file names). Folders deeper than `max_depth` below the root
    are not entered (the root is depth 0); `skip_dir(path)` true prunes a folder too. Symlinked
    folders are never entered (they may lead out of the release, or in a loop). File names may
    still name a FIFO, socket or a symlink out of the release: the image stage refuses those
    (`imaging/files.py`), so they reach quarantine with a reason. A release on object storage
    (a UPath root) is walked through fsspec; its folders are then URLs.
    """
    walk = walk_url(root) if is_url(root) else os.walk(root, followlinks=False)
    for folder, dirs, files in walk:
        dirs[:] = sorted(
            d
            for d in dirs
            if not is_hidden(d) and not (skip_dir is not None and skip_dir(child(root, folder, d)))
        )
        if max_depth is not None and len(relative_parts(folder, root)) >= max_depth:
            dirs[:] = []
        yield folder, dirs, sorted(f for f in files if not is_hidden(f))


def release_files(root: Path | str, *, max_depth: int | None = None) -> Iterator[Path]:
    """Every visible file under `root`, in walk order."""
    for folder, _, files in walk_release(root, max_depth=max_depth):
        for name in files:
            yield child(root, folder, name)


def find_file(
    root: Path,
    names: Sequence[str],
    *,
    loose: bool = False,
    max_depth: int | None = None,
    skip_dir: Callable[[Path], bool] | None = None,
) -> Path | None:
    """The file named like one of `names` (or that name plus `.gz`) under `root`.

    The earliest name in `names` wins, then the shallowest file, then path order. `loose`
    ignores case and accepts a prefix ending in a space, `.`, `_` or `-`
    (`a. RFMiD_Training_Labels.csv`), as releases renamed by their mirrors need.
    """
    wanted = [n.lower() for n in names] if loose else list(names)
    hits = []
    for folder, _, files in walk_release(root, max_depth=max_depth, skip_dir=skip_dir):
        for name in files:
            order = _name_order(name, wanted, loose)
            if order is None:
                continue
            path = child(root, folder, name)
            # A FIFO named like a metadata file would block the scan that reads it (object
            # storage lists only files).
            if is_url(root) or os.path.isfile(path):
                parts = relative_parts(path, root)
                hits.append((order, len(parts), parts, path))
    return min(hits)[3] if hits else None


def _name_order(name: str, wanted: list[str], loose: bool) -> int | None:
    """Position in `wanted` of the first name that `name` stands for, or None."""
    if not loose:
        base = name.removesuffix(".gz")
        return next((k for k, w in enumerate(wanted) if base == w), None)
    lower = name.lower().removesuffix(".gz")
    for order, want in enumerate(wanted):
        head = lower[: len(lower) - len(want)]
        if lower.endswith(want) and (not head or head[-1] in _PREFIX_ENDS):
            return order
    return None


def index_images(
    root: Path | str, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> dict[str, list[str]]:
    """Every image file under `root` by lower-case stem (mixed-case extensions tolerated).

    A stem may name several files (copies in other folders, other formats): the lists keep
    walk order; `pick_image` chooses among them.
    """
    found: dict[str, list[str]] = {}
    for folder, _, files in walk_release(root):
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext.lower() in extensions:
                found.setdefault(stem.lower(), []).append(os.path.join(folder, name))
    return found


def pick_image(
    candidates: list[str], root: Path, prefer: str = "", avoid: tuple[str, ...] = ()
) -> str:
    """The best of several files with one stem: in a folder named like `prefer`, not `avoid`,
    then the shallowest, then path order."""

    def rank(path: str) -> tuple:
        rel = relative_text(path, root).lower()
        return (
            prefer not in rel if prefer else False,
            sum(word in rel for word in avoid),
            rel.count("/"),
            rel,
        )

    return min(candidates, key=rank)


def find_listed(images: dict[str, list[str]], name: str, root: Path) -> str | None:
    """The file a list names (`x.png`, any case) in an `index_images` index: the shallowest of
    those so named, or None."""
    wanted = name.lower()
    candidates = images.get(os.path.splitext(wanted)[0], [])
    found = [p for p in candidates if os.path.basename(p).lower() == wanted]
    return pick_image(found, root) if found else None


# --- reading values ------------------------------------------------------------------------


def parse_finite(raw: Any) -> float | None:
    """A table cell as a finite number; None for blanks, text, NaN and infinities."""
    try:
        value = float(str(raw).strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_age(raw: Any) -> float | None:
    """An age in years from `57`, DICOM AS (`058Y`, `011M`, `006W`, `010D`) or `58 Y`.

    None when unreadable or over 120 years (placeholders such as `414` in copies of releases).
    """
    match = _AGE.fullmatch(str(raw or "").strip())
    if not match:
        return None
    years = int(match.group(1)) / _UNITS_PER_YEAR[match.group(2).upper()]
    return years if years <= MAX_AGE_YEARS else None


def decode_text(data: bytes) -> str:
    """Release text as UTF-8, else Latin-1 (which reads any bytes); a BOM is kept."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")
