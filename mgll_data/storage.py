"""Releases and outputs on object storage (`s3://`, `gs://`, `hf://`, ...) through fsspec.

A location is local (a `Path`) or a URL with a protocol. A remote release root becomes a `UPath`
(universal_pathlib: the pathlib API over fsspec), so sources written against `Path` read it
unchanged; the few places that touch files directly (walking, hashing, opening images and
archives) ask here. Options for the file system come from `--storage-options` (JSON, passed to
the fsspec constructor as `datasets` and pandas do); credentials come from the environment and
the standard config files. A URL that embeds them (`s3://KEY:SECRET@bucket`) is split once,
when it is parsed, so no message, log or output file ever shows them (`docs/architecture.md`,
"Object storage").
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from .errors import UserError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# `scheme://user:password@host`: the credentials part of any URL in a message.
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")
# What s3fs calls embedded credentials; other file systems take username and password.
_CREDENTIAL_NAMES = {"s3": ("key", "secret"), "s3a": ("key", "secret")}

Location = Path | str  # a local folder, or a URL


def is_url(location: object) -> bool:
    """Whether `location` names object storage (`s3://...`, a UPath), not a local path."""
    match = _SCHEME.match(str(location))
    return match is not None and match.group(1).lower() != "file"


def parse_location(text: str) -> Location:
    """A command-line location: a URL stays a string, anything else is a local `Path`."""
    return text if is_url(text) else Path(text)


def parse_storage_options(text: str | None, flag: str = "--storage-options") -> dict[str, Any]:
    """`--storage-options` JSON as a dict; the one-line error never echoes the value."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as err:
        raise UserError(
            f"{flag}: expected a JSON object of fsspec options ({err.msg} at character {err.pos})"
        ) from None
    if not isinstance(value, dict):
        raise UserError(f"{flag}: expected a JSON object of fsspec options")
    return value


def split_credentials(url: str) -> tuple[str, dict[str, str]]:
    """`s3://KEY:SECRET@bucket/x` -> (`s3://bucket/x`, {"key": KEY, "secret": SECRET})."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, {}
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    names = _CREDENTIAL_NAMES.get(parts.scheme.lower(), ("username", "password"))
    found = {name: value for name, value in zip(names, (user, password), strict=True) if value}
    return urlunsplit(parts._replace(netloc=host)), found


def scrub(text: str, options: dict[str, Any] | None = None) -> str:
    """`text` without URL credentials and without any string value of `options`."""
    text = _USERINFO.sub(r"\1", text)
    for value in _strings(options or {}):
        if len(value) >= 4:  # short values (`us`, `1`) are not secrets and would mangle text
            text = text.replace(value, "***")
    return text


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def release_root(location: Location, options: dict[str, Any] | None = None) -> Path:
    """The release root as a path object: a `Path`, or a `UPath` over the URL's file system."""
    if not is_url(location):
        return Path(location)
    if not isinstance(location, str):
        return location  # already a UPath
    try:
        from upath import UPath
    except ImportError:  # pragma: no cover - a dependency; only a broken install lacks it
        raise UserError(f"{scrub(location)}: reading URLs needs universal_pathlib") from None
    url, credentials = split_credentials(location)
    try:
        return UPath(url, **{**(options or {}), **credentials})
    except (ImportError, ValueError) as err:
        raise UserError(f"{url}: {_missing_backend(err)}") from None


def filesystem(url: str, options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """fsspec's (file system, path) for `url`, options and embedded credentials applied."""
    from fsspec.core import url_to_fs

    clean, credentials = split_credentials(url)
    try:
        return url_to_fs(clean, **{**(options or {}), **credentials})
    except (ImportError, ValueError) as err:
        raise UserError(f"{clean}: {_missing_backend(err)}") from None


def _missing_backend(err: Exception) -> str:
    text = " ".join(str(err).split())
    return f"cannot open this storage ({text}; pip install 'mgll[cloud]' adds s3fs and gcsfs)"


def open_binary(path: Path | str) -> IO[bytes]:
    """A local path or a UPath opened for binary reading (fsspec files are seekable)."""
    if is_url(path) and not isinstance(path, str):
        return path.open("rb")
    return open(path, "rb")  # noqa: SIM115 - the caller closes it


def lexists(path: Path) -> bool:
    """Whether `path` names anything: locally a dangling symlink counts (its reader refuses it
    with a reason); object storage has no links."""
    return path.exists() if is_url(path) else os.path.lexists(path)


def relative_parts(path: Path, root: Path) -> tuple[str, ...]:
    """The parts of `path` below `root`, for a local path or a URL."""
    if not is_url(root):
        return Path(path).relative_to(root).parts
    return tuple(p for p in str(path)[len(str(root).rstrip("/")) :].split("/") if p)


def relative_text(path: Path | str, root: Path) -> str:
    """`path` below `root` as a `/`-joined string (`a/b.png`), for a local path or a URL."""
    return "/".join(relative_parts(path, root))


def folder_path(root: Path, folder: str) -> Path:
    """A walked folder (a string: a local path or a URL) as the same kind of path as `root`
    (a UPath keeps root's file system and options)."""
    if not is_url(root):
        return Path(folder)
    below = str(folder)[len(str(root).rstrip("/")) :].strip("/")
    return root.joinpath(*(p for p in below.split("/") if p))


def child(root: Path, folder: str, name: str) -> Path:
    """`folder/name` as the same kind of path as `root`."""
    return folder_path(root, folder) / name


def walk_url(root: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """`os.walk` over a UPath: (folder URL, subfolder names, file names), top-down; prune
    by editing the subfolder list in place, as with `os.walk`."""
    fs, base = root.fs, root.path.rstrip("/")
    prefix = str(root).rstrip("/")
    for folder, dirs, files in fs.walk(base, topdown=True):
        yield prefix + folder.rstrip("/")[len(base) :], dirs, files


def inside_root(url: str, root: str) -> bool:
    """Whether `url` stays under `root` once `..` is resolved (object storage has no links)."""
    base = root.rstrip("/")
    scheme = _SCHEME.match(base)
    head = scheme.group(0) if scheme else ""
    if not url.startswith(head):
        return False
    path = posixpath.normpath(url[len(head) :])
    below = base[len(head) :]
    return path == below or path.startswith(below + "/")


def root_problem(root: Path) -> str | None:
    """Why `root` cannot be read as a release folder (one line, no secrets), or None."""
    if is_url(root) and getattr(root, "protocol", "") in ("hf", "huggingface"):
        problem = _hub_problem(root)
        if problem:
            return problem
    try:
        return None if root.is_dir() else "release root is not a directory"
    except Exception as err:  # noqa: BLE001 - storage clients raise their own kinds
        if not is_url(root):
            raise
        # no credentials, access denied, no route to the endpoint: the client's words
        said = f"cannot list the release root ({type(err).__name__}: {_one_line(err)})"
        return scrub(said, dict(getattr(root, "storage_options", {})))


def _hub_problem(root: Any) -> str | None:
    """Ask the Hub about the repo and revision of an `hf://` root (HfFileSystem caches the
    answer), so a refusal reads as the Hub's reason rather than as a missing folder."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HfHubHTTPError

    try:
        root.fs.resolve_path(root.path)
        return None
    except ValueError as err:  # HfUriError: not `datasets/namespace/name[@revision]/...`
        problem = f"not a Hub repository path ({_one_line(err)})"
    except ConnectionError as err:  # OfflineModeIsEnabled: HF_HUB_OFFLINE is set
        problem = f"cannot reach the Hub ({_one_line(err)})"
    except (FileNotFoundError, HfHubHTTPError) as err:
        cause = (err.__cause__ or err) if isinstance(err, FileNotFoundError) else err
        status = getattr(getattr(cause, "response", None), "status_code", None)
        reason = _one_line(getattr(cause, "server_message", None) or cause)
        said = f"{status}: {reason}" if status else reason
        problem = (
            f"the Hub does not show this repository or revision ({said}); a "
            "private one needs a token that may read it, in HF_TOKEN or from `hf auth login`"
        )
    except Exception as err:  # noqa: BLE001 - the Hub client's own transport errors (httpx)
        problem = f"cannot reach the Hub ({type(err).__name__}: {_one_line(err)})"
    return scrub(problem, {"token": get_token() or "", **root.storage_options})


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# What names a file's version in a listing, most telling first: an S3 or GCS ETag; the git blob
# id of a Hugging Face repo file (it follows the content, not the commit, and is listed with
# no extra request); a Hub bucket's content hash; last a modification time.
_VERSION_FIELDS = ("ETag", "etag", "blob_id", "xet_hash", "LastModified", "mtime")


class RemoteStamps:
    """Size and version (see `_VERSION_FIELDS`) of the files under a remote root, from one
    listing: one request per folder page, not one per image."""

    def __init__(self, root: Path):
        self.root = str(root).rstrip("/") + "/"
        self._fs = root.fs
        self._base = root.path.rstrip("/") + "/"
        self._listing: dict[str, dict[str, Any]] | None = None

    def of(self, path: str) -> str:
        if self._listing is None:
            found = self._fs.find(self._base, detail=True)
            self._listing = {self._fs._strip_protocol(k): v for k, v in found.items()}
        info = self._listing.get(self._fs._strip_protocol(path))
        if info is None:  # missing, or a pattern (archive members): the stage quarantines it
            return "-"
        version = next((info[k] for k in _VERSION_FIELDS if info.get(k)), "")
        return f"{info.get('size')}:{str(version).strip(chr(34))}"

    def relative(self, path: str) -> str:
        return path[len(self.root) :] if path.startswith(self.root) else path
