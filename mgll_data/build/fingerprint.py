"""The build fingerprint that `--resume` compares: configuration, versions and release files.

Release files count by size and version without being read (a stat locally, one listing on
object storage), with paths relative to the release root, so a moved release still resumes.
"""

from __future__ import annotations

import hashlib
import os
import platform
import zlib
from importlib.metadata import version
from pathlib import Path
from typing import Any

from .. import __version__
from ..schema import dumps_sorted
from ..sources.base import ScanResult
from ..storage import RemoteStamps, is_url
from ..vocab import Vocabulary
from .items import RawItem
from .pipeline import Pipeline
from .writer import file_sha256


def library_versions() -> dict[str, str]:
    """Versions of everything that shapes output bytes."""
    import numpy
    import PIL
    import pyarrow

    return {
        "mgll": __version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "pyarrow": pyarrow.__version__,
        "pillow": PIL.__version__,
        "datasets": version("datasets"),  # metadata, not an import: ~0.75 s in each Ray worker
        "zlib": zlib.ZLIB_RUNTIME_VERSION,  # the stored PNGs are compressed by Python's zlib
    }


def fingerprint(
    pipeline: Pipeline,
    vocab: Vocabulary,
    options: Any,  # BuildOptions (its module imports this one)
    scan: ScanResult,
    items: list[RawItem],
    root: Path,
) -> str:
    """What `--resume` compares: configuration, versions, metadata files, and every image file.

    Image files count by size and mtime (a stat, not a read: cheap on any release size, see
    benchmarks/fingerprint_cost.py); paths count relative to `root`, so a moved release resumes.
    """
    digest = hashlib.sha256()
    digest.update(dumps_sorted(pipeline.raw).encode())
    # the whole vocabulary: its mentions and triggers shape text-mined labels and texts
    digest.update(dumps_sorted(vocab.raw).encode())
    digest.update(dumps_sorted(options.fingerprint_options()).encode())
    digest.update(dumps_sorted(library_versions()).encode())
    for path in scan.inputs:
        digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
    stamps = file_stamps(root)
    for archive in scan.archives:
        digest.update(f"{stamps.relative(str(archive))}:{stamps.of(str(archive))}\n".encode())
    for item in items:
        where = stamps.relative(item.image.describe())
        digest.update(
            f"{item.id}\t{item.split}\t{where}\t{stamps.of(_image_file(item))}\n".encode()
        )
    return digest.hexdigest()


def file_stamps(root: Path) -> _FileStamps | RemoteStamps:
    """What identifies each release file's content cheaply, and paths relative to `root`."""
    return RemoteStamps(root) if is_url(root) else _FileStamps(root)


def _image_file(item: RawItem) -> str:
    """The file that holds an item's image bytes (a source may keep it in `location.path`)."""
    location = getattr(item.location, "path", None)
    return str(location if location is not None else item.image.path)


class _FileStamps:
    """Size and mtime of files, each stat'ed once, and paths relative to the release root."""

    def __init__(self, root: Path):
        self.root = os.path.abspath(root) + os.sep
        self._seen: dict[str, str] = {}

    def of(self, path: str) -> str:
        if path not in self._seen:
            try:
                stat = os.stat(path)
                self._seen[path] = f"{stat.st_size}:{stat.st_mtime_ns}"
            except OSError:  # missing, or a pattern (archive members): the stage quarantines it
                self._seen[path] = "-"
        return self._seen[path]

    def relative(self, path: str) -> str:
        absolute = os.path.abspath(path)
        return absolute[len(self.root) :] if absolute.startswith(self.root) else path
