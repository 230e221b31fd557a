"""A build whose `--out` is on object storage: written in a local staging folder, uploaded.

Each finished shard (and its state file) is uploaded as soon as it is complete, the manifest at
the start (incomplete) and again last (complete), after the card and the quarantine list; one
upload (`put_file`) is one whole object, so a reader never sees half a file. `--resume` reads
the remote listing back: the manifest and shard states, and the shards they name (to check
their SHA-256), into the staging folder. Object storage has no `flock`: nothing stops two
builds writing one prefix at the same time (see `docs/architecture.md`, "Object storage").
"""

from __future__ import annotations

import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..storage import filesystem, split_credentials

# What a build leaves in its output folder and a replacing build removes.
_BUILD_PARTS = ("data", "_build", "README.md", "figures")


class RemoteOutput:
    """The remote folder of a build and the local staging folder mirrored into it."""

    def __init__(self, url: str, options: dict[str, Any] | None, staging: Path):
        self.url = split_credentials(url)[0]
        self.fs, self.base = filesystem(url, options)
        self.base = self.base.rstrip("/")
        self.staging = staging

    def listing(self) -> list[str]:
        """Every file under the remote folder, relative to it."""
        if not self.fs.exists(self.base):
            return []
        found = self.fs.find(self.base)
        return sorted(self.fs._strip_protocol(f)[len(self.base) + 1 :] for f in found)

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Refuse or clear an existing build as a local one would; for `resume`, download what
        the build engine reads back (manifest, shard states and the shards they name)."""
        files = self.listing()
        existing = "_build/manifest.json" in files or any(_is_shard(f) for f in files)
        if resume and "_build/manifest.json" not in files:
            raise UserError(f"{self.url}: nothing to resume (no _build/manifest.json)")
        if not resume and existing and not overwrite:
            raise UserError(
                f"{self.url}: already holds a build; use --resume to finish it "
                "or --overwrite to replace it"
            )
        if not resume:
            for name in files:
                if name.split("/", 1)[0] in _BUILD_PARTS:
                    self.fs.rm_file(f"{self.base}/{name}")
            return
        for name in files:
            if name == "_build/manifest.json" or name.startswith("_build/shards/"):
                self.download(name)
        for name in files:
            if _is_shard(name) and f"_build/shards/{posixpath.basename(name)}.json" in files:
                self.download(name)

    def download(self, name: str) -> None:
        target = self.staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(f"{self.base}/{name}", str(target))

    def upload(self, path: Path) -> None:
        """Upload one staged file to the same place under the remote folder."""
        name = path.relative_to(self.staging).as_posix()
        self.fs.put_file(str(path), f"{self.base}/{name}")

    def finish(self, manifest: Path) -> None:
        """Upload every staged output file not yet there, the manifest last, and remove remote
        shards the build no longer names (as a local build removes stale ones)."""
        staged = sorted(
            p
            for p in self.staging.rglob("*")
            if p.is_file() and not _internal(p.relative_to(self.staging).as_posix())
        )
        for path in staged:
            if path != manifest:
                self.upload(path)
        wanted = {p.relative_to(self.staging).as_posix() for p in staged}
        for name in self.listing():
            stale = _is_shard(name) or name.startswith("_build/shards/")
            if stale and name not in wanted:
                self.fs.rm_file(f"{self.base}/{name}")
        self.upload(manifest)


def _is_shard(name: str) -> bool:
    return name.startswith("data/") and name.endswith(".parquet")


def _internal(name: str) -> bool:
    """Staging files that never leave the machine: the lock and unfinished shards."""
    return name.startswith("_build/tmp/") or posixpath.basename(name).startswith(".")


@contextmanager
def staged_output(
    url: str, options: dict[str, Any] | None, *, resume: bool, overwrite: bool
) -> Iterator[RemoteOutput]:
    """A RemoteOutput with a fresh staging folder, removed afterwards whatever happens."""
    staging = Path(tempfile.mkdtemp(prefix="mgll-out-"))
    try:
        remote = RemoteOutput(url, options, staging)
        remote.prepare(resume, overwrite)
        yield remote
    finally:
        shutil.rmtree(staging, ignore_errors=True)
