"""One command per dataset folder: an advisory lock file, `<folder>/.mgll.lock`.

Commands that write a folder (build, demo, merge's output, export's destination) hold an
exclusive `fcntl.flock` on it; commands that only read a dataset (export, merge's inputs, push)
hold a shared one, so a build never replaces a dataset that is being read. The kernel drops the
lock when its holder dies, so a lock file left by a killed build is taken over (with a note).
The file records the holder (pid, host, start time) for the refusal message; it is removed on
release when no one else holds it, and nothing that lists a dataset's files reads a dot-file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from ..errors import UserError

LOCK_NAME = ".mgll.lock"
# Folders this process holds, by lock-file path: nested holds (the demo CLI around the engine)
# share the one flock instead of refusing themselves.
_held: dict[str, int] = {}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


@contextmanager
def folder_lock(
    folder: Path,
    *,
    shared: bool = False,
    log: Callable[[str], None] = _stderr,
) -> Iterator[None]:
    """Hold `folder`'s lock for the duration of the block; refuse in one line if it is taken.

    `shared`: a reader, which may share the folder with other readers but never with a writer.
    A writer creates `folder` if needed; a reader of a folder that does not exist, or cannot
    hold a lock in it (read-only), goes on without one: nothing can be writing there.
    """
    folder = Path(folder)
    path = os.path.abspath(folder / LOCK_NAME)
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    created = not folder.exists()
    fd = _acquire(folder, path, shared, log)
    if fd is None:
        yield
        return
    _held[path] = 1
    try:
        yield
    finally:
        del _held[path]
        _release(fd, path)
        if created:  # a command that failed before writing anything leaves no empty folder
            with suppress(OSError):
                folder.rmdir()


def _acquire(folder: Path, path: str, shared: bool, log: Callable[[str], None]) -> int | None:
    """Take the flock on the file at `path` (created if needed); None: a reader without one."""
    if shared and not folder.is_dir():
        return None
    if not shared:
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{folder}: not a folder (expected a folder to write into)")
        folder.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            if shared and err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                return None
            raise
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            doing = holder.get("action", "working")
            raise UserError(f"{folder}: another {_describe(holder)} is {doing} here") from None
        # A holder that released in between may have removed the file: lock the current one.
        if _same_file(fd, path):
            break
        os.close(fd)
    previous = _read_holder(fd)
    if previous.get("action") == "writing" and not _running(previous):
        log(
            f"note: {folder}: taking over the lock of an interrupted {_describe(previous)}, "
            "which is no longer running"
        )
    _write_holder(fd, "reading" if shared else "writing")
    return fd


def _release(fd: int, path: str) -> None:
    """Drop the lock; remove the file first when no other process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _same_file(fd, path):
            os.unlink(path)
    except OSError:
        pass  # another reader still holds it (or the folder is gone): leave the file
    finally:
        os.close(fd)


def _same_file(fd: int, path: str) -> bool:
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    there = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _write_holder(fd: int, action: str) -> None:
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.time(),
        "action": action,
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info, sort_keys=True) + "\n").encode(), 0)


def _read_holder(fd: int) -> dict[str, Any]:
    """What the lock file says about its holder ({} when empty or unreadable)."""
    try:
        data = os.pread(fd, 4096, 0)
        info = json.loads(data)
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _running(holder: dict[str, Any]) -> bool:
    """Whether the holder's process still runs (assumed so for another host's process)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _describe(holder: dict[str, Any]) -> str:
    """`mgll-build-dataset (pid 1234, started 20:41:05)`, as far as the lock file says."""
    details = []
    if isinstance(holder.get("pid"), int):
        details.append(f"pid {holder['pid']}")
    host = holder.get("host")
    if host and host != socket.gethostname():
        details.append(f"on {host}")
    started = holder.get("started")
    if isinstance(started, int | float):
        shown = time.localtime(started)
        same_day = shown[:3] == time.localtime()[:3]
        details.append(
            "started " + time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S", shown)
        )
    return "mgll-build-dataset" + (f" ({', '.join(details)})" if details else "")
