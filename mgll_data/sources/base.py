"""The Source interface: one class per release layout, yielding RawItems (no image work)."""

from __future__ import annotations

import dataclasses
import posixpath
import tarfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..build.items import ImageRef, QuarantineEntry, RawItem
from ..build.pipeline import Pipeline
from ..build.stages import Task
from ..errors import UserError
from ..storage import open_binary, release_root, root_problem
from ..vocab import Vocabulary
from .archives import ZipLimits


@dataclass
class ScanResult:
    """Everything a source found: the items, rows it could not place (quarantined), the
    metadata files that define the items (for the build fingerprint) and the archives that may
    hold images (read in one pass by `Source.tasks`)."""

    items: list[RawItem]
    quarantine: list[QuarantineEntry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # facts for the summary (dialect, layout)
    inputs: list[Path] = field(default_factory=list)
    archives: list[Path] = field(default_factory=list)


class Source(ABC):
    """Reads one release layout. Subclasses check the layout, then scan it into RawItems."""

    # Command-line options this source understands (`--images`, `--views`, `--labels`).
    OPTIONS: ClassVar[frozenset[str]] = frozenset()
    # Optional record columns this source fills (schemas/record.yaml), e.g. ("mask",).
    OPTIONAL_COLUMNS: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        root: Path,
        pipeline: Pipeline,
        vocab: Vocabulary,
        options: dict[str, str] | None = None,
    ):
        self.root = release_root(root)  # a Path, or a UPath for a release on object storage
        self.pipeline = pipeline
        self.vocab = vocab
        self.options = dict(options or {})
        unsupported = sorted(set(self.options) - self.OPTIONS)
        if unsupported:
            flags = [f"--{o.replace('_', '-')}" for o in sorted(self.OPTIONS)]
            raise UserError(
                f"pipeline {pipeline.name!r} does not take --{unsupported[0].replace('_', '-')} "
                f"(its source takes: {', '.join(flags) or 'no options'})"
            )
        problem = root_problem(self.root)
        if problem:
            raise UserError(f"{self.root}: {problem}")

    @abstractmethod
    def scan(self) -> ScanResult:
        """Check the layout (raising UserError naming what is missing), then return what was
        found: the items, the quarantined rows, the input files and any image archives."""

    def annotated_labels(self) -> list[str]:
        """The labels this source can assert (vocabulary order): the label map's targets."""
        targets = set(self.pipeline.labels.map.values())
        return [name for name in self.vocab.names if name in targets]

    def required_label_map(self) -> dict[str, str]:
        """`labels.map`, for a source that cannot read its release without one."""
        if not self.pipeline.labels.map:
            raise UserError(
                f"{self.pipeline.path}: labels.map: the {self.pipeline.source} source needs a "
                "mapping of column -> label"
            )
        return self.pipeline.labels.map

    def tasks(
        self, planned: list[tuple[tuple[str, int], RawItem]], archives: Sequence[Path] = ()
    ) -> Iterator[Task]:
        """Tasks for the planned items in the order they are cheapest to read.

        Items whose image is a plain file come first, in the given order; items whose image sits
        in an archive are read in one sequential pass over the archives.
        """
        in_archives = [(pos, item) for pos, item in planned if item.image.member is not None]
        for pos, item in planned:
            if item.image.member is None:
                yield Task(pos, item)
        if in_archives:
            yield from stream_archives(archives, in_archives)


def stream_archives(
    archives: Iterable[Path],
    wanted: list[tuple[tuple[str, int], RawItem]],
    max_member_bytes: int = ZipLimits.max_member_bytes,
) -> Iterator[Task]:
    """Read tar(.gz) archives once, sequentially, yielding a Task for each wanted member.

    Members are matched by base name. Items found in no archive (or cut off by a truncated
    archive), and members larger than `max_member_bytes`, yield a Task with an error, so they
    reach quarantine with a reason; a member is never held in memory past that cap. An archive
    on object storage is streamed from the remote file, never copied whole.
    """
    by_name = {posixpath.basename(item.image.member or ""): (pos, item) for pos, item in wanted}
    problems: list[str] = []
    for archive in archives:
        try:
            with open_binary(archive) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
                for member in tar:
                    key = posixpath.basename(member.name)
                    if not member.isfile() or key not in by_name:
                        continue
                    pos, item = by_name.pop(key)
                    ref = ImageRef(str(archive), member.name)
                    item = dataclasses.replace(item, image=ref)
                    if member.size > max_member_bytes:  # a tar header states the true size
                        yield Task(pos, item, error=_oversized(member.size, max_member_bytes))
                        continue
                    handle = tar.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    yield Task(pos, item, image_bytes=data)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            problems.append(f"{archive.name} is truncated or corrupt ({err})")
    reason = "image found in no archive"
    if problems:
        reason += "; " + "; ".join(problems)
    for pos, item in by_name.values():
        yield Task(pos, item, error=reason)


def _oversized(size: int, cap: int) -> str:
    return f"archive member is {size:,} bytes, over the {cap:,}-byte cap for one image"
