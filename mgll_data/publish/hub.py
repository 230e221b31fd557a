"""`push`: publish a built dataset folder to a Hugging Face Hub dataset repo.

The built files go up byte for byte (so the `mgll` Parquet metadata and the manifest's shard
hashes hold on the Hub too), in one commit: README.md, `data/**/*.parquet` and `figures/*.png`,
never `_build/`. Files whose remote hash (LFS sha256, or git blob id for small files) equals the
local one are skipped, and remote `data/` / `figures/` files the build no longer has are deleted,
so pushing again uploads only what changed.

The licence guard reads each source's `license` block from the manifest:
`redistribution: none` refuses any data push (use `--card-only`), `noncommercial` pushes with the
licence stated in the card. The token is never printed: every message is redacted.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..build.lock import folder_lock
from ..build.writer import file_sha256
from ..errors import UserError
from .inspect import verify_shards

# Folders of a built dataset that are published; everything else (notably `_build/`) is not.
PUBLISHED = ("data", "figures")


@dataclass
class PushResult:
    """What one push did (paths in the repo)."""

    repo_id: str
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    commit: str | None = None

    def lines(self) -> list[str]:
        what = f"committed {self.commit}" if self.commit else "nothing changed, no commit made"
        return [
            f"pushed to {self.repo_id}: {len(self.uploaded)} file(s) uploaded, "
            f"{len(self.unchanged)} unchanged, {len(self.deleted)} deleted; {what}"
        ]


def read_manifest(out: Path) -> dict[str, Any]:
    """The manifest of a complete build (or merge) at `out`."""
    path = Path(out) / "_build" / "manifest.json"
    if not path.is_file():
        raise UserError(f"{out}: no _build/manifest.json (not a built mgll dataset?)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if not manifest.get("complete"):
        raise UserError(f"{path}: build not complete (finish it with --resume first)")
    return manifest


def licences(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The licence blocks of every source in a build (one) or a merge (one per source)."""
    if "licenses" in manifest:
        return list(manifest["licenses"])
    licence = (manifest.get("config") or {}).get("license")
    if not licence:
        raise UserError("the manifest holds no licence block; rebuild with a current mgll")
    return [licence]


def check_licence(manifest: dict[str, Any], card_only: bool, where: Path) -> list[str]:
    """Apply the licence guard; return notes to print. Raises UserError when refused."""
    notes = []
    for licence in licences(manifest):
        mode = licence.get("redistribution")
        if mode == "none" and not card_only:
            raise UserError(
                f"{where}: licence {licence.get('id')!r} forbids redistribution "
                "(a private repo is still a third party); publish the card and rebuild "
                "recipe without data with --card-only"
            )
        if mode == "noncommercial":
            notes.append(f"licence {licence.get('id')!r} is non-commercial; the card states it")
        if mode not in ("public", "noncommercial", "none"):
            raise UserError(f"{where}: unknown licence redistribution {mode!r}")
    return notes


def git_blob_id(data: bytes) -> str:
    """The git blob sha1 the Hub reports as `oid` for a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def local_files(out: Path, manifest: dict[str, Any]) -> dict[str, Path]:
    """Repo path -> local file of everything a data push publishes."""
    out = Path(out)
    files = {"README.md": out / "README.md"}
    if not files["README.md"].is_file():
        raise UserError(f"{out}: no README.md (not a built mgll dataset?)")
    for folder in PUBLISHED:
        for path in sorted((out / folder).rglob("*")):
            if path.is_file() and path.suffix in (".parquet", ".png"):
                files[path.relative_to(out).as_posix()] = path
    shards = [p for p in files if p.endswith(".parquet")]
    if not shards:
        raise UserError(f"{out}: no data/*.parquet shards to push")
    listed = {s["path"] for s in manifest.get("shards", [])}
    unlisted = sorted(set(shards) - listed)
    if unlisted:
        raise UserError(f"{out}: {unlisted[0]} is not in the manifest (stray file?)")
    return files


class _Redactor:
    def __init__(self, token: str | None):
        self.secrets = [t for t in (token, os.environ.get("HF_TOKEN")) if t]

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return " ".join(text.split())


def push(
    out: Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    card_only: bool = False,
    log: Callable[[str], None] = print,
) -> PushResult:
    """Push the dataset at `out` to the dataset repo `repo_id` (see the module doc).

    Holds `out`'s lock as a reader, and pushes only shards that match the manifest.
    """
    out = Path(out)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"--repo-id must look like ORG/NAME, got {repo_id!r}")
    with folder_lock(out, shared=True):
        return _checked_push(out, repo_id, private, token, card_only, log)


def _checked_push(
    out: Path,
    repo_id: str,
    private: bool,
    token: str | None,
    card_only: bool,
    log: Callable[[str], None],
) -> PushResult:
    manifest = read_manifest(out)
    for note in check_licence(manifest, card_only, out):
        log(f"note: {note}")
    redact = _Redactor(token)

    if card_only:
        from .card import card_only_text

        readme = (out / "README.md").read_text(encoding="utf-8")
        contents = {"README.md": card_only_text(readme).encode("utf-8")}
        sha = {"README.md": hashlib.sha256(contents["README.md"]).hexdigest()}
    else:
        files = local_files(out, manifest)
        verified = verify_shards(out, manifest)
        contents = dict(files)
        sha = {path: verified.get(path) or file_sha256(local) for path, local in files.items()}

    from huggingface_hub.utils import logging as hub_logging

    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # retries stay quiet; a failure is the one line below
    try:
        return _push(repo_id, contents, sha, private, token, card_only, log)
    except UserError:
        raise
    except Exception as err:  # any Hub/HTTP failure: one redacted line
        if getattr(getattr(err, "response", None), "status_code", None) == 412:
            raise UserError(
                f"push to {repo_id} failed: the repo changed on the Hub during the push (a "
                "commit landed after it was listed); nothing was committed, push again"
            ) from None
        raise UserError(redact(f"push to {repo_id} failed: {type(err).__name__}: {err}")) from None
    finally:
        hub_logging.set_verbosity(verbosity)


def _push(
    repo_id: str,
    contents: dict[str, Path | bytes],
    sha: dict[str, str],
    private: bool,
    token: str | None,
    card_only: bool,
    log: Callable[[str], None],
) -> PushResult:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    # The commit names the head it was computed against: a commit landing in between is a
    # 412, not merged with this one (which would keep stale files or drop theirs).
    head = api.repo_info(repo_id, repo_type="dataset").sha
    remote = {}
    for entry in api.list_repo_tree(repo_id, repo_type="dataset", recursive=True, revision=head):
        if hasattr(entry, "blob_id"):  # a file, not a folder
            remote[entry.path] = entry
    result = PushResult(repo_id)
    operations: list[Any] = []
    for path, source in sorted(contents.items()):
        entry = remote.get(path)
        if entry is not None:
            if entry.lfs is not None:
                same = entry.lfs.sha256 == sha[path]
            else:
                data = source if isinstance(source, bytes) else Path(source).read_bytes()
                same = entry.blob_id == git_blob_id(data)
            if same:
                result.unchanged.append(path)
                continue
        operations.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=source))
        result.uploaded.append(path)
    for path in sorted(remote):
        # Stale published files go; a card-only push removes every data file it finds.
        if path.split("/", 1)[0] in PUBLISHED and path not in contents:
            operations.append(CommitOperationDelete(path_in_repo=path))
            result.deleted.append(path)
    if operations:
        what = "card only (no data)" if card_only else "dataset"
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=f"mgll-build-dataset push: {what}",
            repo_type="dataset",
            parent_commit=head,
        )
        result.commit = getattr(info, "oid", None) or "done"
    for line in result.lines():
        log(line)
    return result
