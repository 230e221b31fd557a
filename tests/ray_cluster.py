"""A real Ray cluster for tests: a head in a subprocess on 127.0.0.1, and Ray's own records of
who joined it.

`ray_head(folder)` starts a two-CPU head whose temp folder is `folder` (keep it short, under
/tmp: Ray's socket paths must stay under 108 bytes) and yields (address, session folder). The
head, its raylet and its workers take their environment from this process at that moment, as a
real node's processes take theirs from the machine they run on (credentials included). Which
cluster did the work is read from Ray's logs: the session folder holds a
`python-core-driver-*_<pid>.log` for every driver that joined it, and a
`python-core-worker-*_<pid>.log` for every worker process it started.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

HEAD = """
import logging, sys, ray
ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes stdin
ray.shutdown()
"""


def ray_env(ray_tmp: Path, **extra: str) -> dict[str, str]:
    """This process's environment for a Ray process: its temp folder `ray_tmp`, token
    authentication, no inherited RAY_ADDRESS, offline, one BLAS thread."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_TMPDIR=str(ray_tmp))
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    return env


def processes_under(folder: Path) -> list[int]:
    """Processes whose command line names `folder` (Ray's own processes name their session)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(str(folder) in part for part in proc.info["cmdline"] or ()):
            found.append(proc.info["pid"])
    return found


@contextmanager
def ray_head(ray_tmp: Path) -> Iterator[tuple[str, Path]]:
    """A two-CPU Ray head in a subprocess: (its address, its session folder). On leaving, the
    head shuts down and no process of its session may remain."""
    ray_tmp.mkdir(parents=True, exist_ok=True)
    head = subprocess.Popen(
        [sys.executable, "-c", HEAD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=ray_env(ray_tmp),
    )
    address = head.stdout.readline().strip()
    assert address, "the Ray head did not start"
    session = (ray_tmp / "ray" / "session_latest").resolve()
    try:
        yield address, session
    finally:
        head.stdin.close()
        head.wait(timeout=120)
    assert processes_under(session) == [], "Ray processes outlived the head"


def ray_pids(session: Path, kind: str = "driver") -> set[int]:
    """The pids of the drivers that joined the cluster of `session` (kind "worker": of its
    worker processes), from the logs Ray names after them."""
    logs = (session / "logs").glob(f"python-core-{kind}-*.log")
    return {int(log.stem.rsplit("_", 1)[1]) for log in logs}
