"""The Ray executor: the same per-item stages, one Ray task per shard, on a Ray cluster or on a
local instance it starts (`docs/architecture.md`, "Data flow").

The driver (the `build` process) scans the release and plans the shards as for a local build;
each shard's tasks travel to a Ray worker as one Ray task and its outcomes come back to the
driver's writer, so the output is the same bytes as a local build's. Workers read image files by
the paths the driver saw (a cluster needs the release on shared storage, or a release URL they
open with their own credentials); images read from archives by the driver travel inside the task.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

from ..errors import UserError
from .executors import ExecutorSpec
from .stages import BuildContext, Outcome, Task, run_task

RAY_REQUIREMENT = "ray==2.60.0"
# A Ray task whose worker died (killed, out of memory, node lost) is run again this many times;
# the stages are pure, so a rerun gives the same outcomes.
MAX_RETRIES = 3
# Archive members travel with their task: one Ray task carries at most this many image bytes.
BATCH_BYTES = 64 * 2**20
# Shards submitted and not yet handed to the writer, per CPU: the running ones, and as many
# finished ones waiting for an earlier shard.
OUTSTANDING_PER_CPU = 2
# fsspec options that hold credentials (s3fs, gcsfs, adlfs, the Hub, and the botocore names
# under client_kwargs): they never leave the driver. Ray's object store may spill to disk and a
# node's credentials are its own, so workers open the release URL with the other options.
CREDENTIAL_OPTIONS = frozenset(
    {
        "key",
        "secret",
        "token",
        "session_token",
        "password",
        "username",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "account_key",
        "sas_token",
        "connection_string",
        "client_secret",
        "credentials",
    }
)


def require_ray() -> Any:
    """The `ray` module, or a UserError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(
            f"--executor ray: Ray is not installed (pip install 'mgll[ray]', i.e. "
            f"{RAY_REQUIREMENT})"
        ) from None
    return ray


def preflight(address: str | None) -> None:
    """Before any work: Ray is installed, and the cluster to join (`address`, else
    RAY_ADDRESS) answers."""
    require_ray()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)


def shard_batches(
    tasks: Iterable[Task], rows_per_shard: int, max_bytes: int = BATCH_BYTES
) -> Iterator[list[Task]]:
    """Group consecutive tasks of one shard into batches; a batch never spans two shards.

    Items read from plain files arrive in shard order, so each shard is one batch. Archive
    members arrive in archive order: their batches are runs of one shard, cut at `max_bytes` of
    image bytes so that no Ray task carries an unbounded load.
    """
    batch: list[Task] = []
    key: tuple[str, int] | None = None
    size = 0
    for task in tasks:
        task_key = (task.position[0], task.position[1] // rows_per_shard)
        task_size = len(task.image_bytes or b"")
        if batch and (task_key != key or size + task_size > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(task)
        key, size = task_key, size + task_size
    if batch:
        yield batch


@functools.cache
def _worker_versions() -> tuple[str, dict[str, str]]:
    # the fingerprint module, not the engine: a worker needs none of the sources or the writer
    from .fingerprint import library_versions

    return socket.gethostname(), library_versions()


def _run_batch(ctx: BuildContext, tasks: list[Task]) -> tuple[tuple[str, dict], list[Outcome]]:
    """On a Ray worker: the stages over one batch, with the worker's host and library versions."""
    return _worker_versions(), [run_task(task, ctx) for task in tasks]


def run_on_ray(tasks: Iterable[Task], ctx: BuildContext, spec: ExecutorSpec) -> Iterator[Outcome]:
    """Run `tasks` on Ray, one Ray task per shard, yielding outcomes in task order.

    At most as many shards run as the cluster has CPUs, and at most `OUTSTANDING_PER_CPU` times
    that many are submitted and not yet yielded, so the driver holds a bounded number of results
    however large the build.
    """
    ray = require_ray()
    options, withheld = without_credentials(ctx.storage_options)
    if withheld:
        names = ", ".join(sorted(withheld))
        print(
            f"note: --executor ray: credentials in --storage-options ({names}) stay on this "
            "machine; Ray workers read the release with their own (environment, config files)",
            file=sys.stderr,
        )
    with _connected(ray, spec) as cpus:
        remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(_run_batch)
        # sent once, not with every task
        ctx_ref = ray.put(replace(ctx, storage_options=options))
        _, expected = _worker_versions()
        window = _Window(ray, lambda batch: remote.remote(ctx_ref, batch), cpus)
        try:
            for ref, first in window.in_order(shard_batches(tasks, spec.rows_per_shard)):
                yield from _collect(ray, ref, first, expected)
        finally:
            window.cancel()  # stopped early (--max-errors, Ctrl-C): drop queued work


def without_credentials(options: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """`options` without the `CREDENTIAL_OPTIONS` at any depth, and the names taken out."""
    kept: dict[str, Any] = {}
    withheld: set[str] = set()
    for name, value in options.items():
        if name.lower() in CREDENTIAL_OPTIONS:
            withheld.add(name)
        elif isinstance(value, dict):
            kept[name], inner = without_credentials(value)
            withheld |= inner
        else:
            kept[name] = value
    return kept, withheld


class _Window:
    """Shards submitted to Ray, handed back in submission order once each has finished.

    A CPU that finishes its shard gets the next one at once, even while the driver still waits
    for an earlier shard (whose outcomes must be written first): a slow shard does not idle the
    others. Finished results stay in Ray's object store until their turn.
    """

    def __init__(self, ray: Any, submit: Callable[[list[Task]], Any], cpus: int):
        self.ray, self.submit, self.cpus = ray, submit, cpus
        self.order: deque[tuple[Any, Task]] = deque()  # submitted, not yet handed back
        self.running: set[Any] = set()  # submitted, not known to be finished

    def in_order(self, batches: Iterator[list[Task]]) -> Iterator[tuple[Any, Task]]:
        """(ref, first task) of each batch, in order, once its Ray task has finished."""
        self._fill(batches)
        while self.order:
            head, first = self.order[0]
            while head in self.running:
                done, _ = self.ray.wait(list(self.running), num_returns=1, fetch_local=False)
                self.running.difference_update(done)
                self._fill(batches)
            self.order.popleft()
            self._fill(batches)  # the next shard starts before this one's outcomes are written
            yield head, first

    def _fill(self, batches: Iterator[list[Task]]) -> None:
        while len(self.running) < self.cpus and len(self.order) < OUTSTANDING_PER_CPU * self.cpus:
            batch = next(batches, None)
            if batch is None:
                return
            ref = self.submit(batch)
            self.order.append((ref, batch[0]))
            self.running.add(ref)

    def cancel(self) -> None:
        for ref, _ in self.order:
            self.ray.cancel(ref)


def _collect(ray: Any, ref: Any, first: Task, expected: dict[str, str]) -> list[Outcome]:
    """The outcomes of one Ray task, once its worker is known to have this machine's versions."""
    try:
        (host, versions), outcomes = ray.get(ref)
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as err:
        raise UserError(
            f"{first.item.image.describe()}: the Ray workers building its shard died "
            f"{MAX_RETRIES + 1} times ({type(err).__name__}); finish the build with --resume"
        ) from None
    differing = sorted(k for k in expected if versions.get(k) != expected[k])
    if differing:
        name = differing[0]
        raise UserError(
            f"Ray worker on {host}: {name} {versions.get(name)} where this machine has "
            f"{expected[name]}; the output would differ from a local build (install the same "
            "versions on every node)"
        )
    return outcomes


@contextlib.contextmanager
def _connected(ray: Any, spec: ExecutorSpec) -> Iterator[int]:
    """Join the cluster (`spec.ray_address`, else RAY_ADDRESS) or start a local instance with
    `spec.workers` CPUs; yield the number of shards to keep in flight (the cluster's CPUs).

    A connection this process already made is used as it is and left open.
    """
    if ray.is_initialized():
        yield _cpus(ray)
        return
    address = spec.ray_address or os.environ.get("RAY_ADDRESS")
    quiet = {"logging_level": logging.WARNING}
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as err:
            hint = (
                ""
                if os.environ.get("RAY_AUTH_MODE")
                else "; if it uses token authentication, set RAY_AUTH_MODE=token"
            )
            raise UserError(f"Ray cluster at {address}: cannot join it ({err}{hint})") from None
    else:
        ray.init(address="local", num_cpus=spec.workers, include_dashboard=False, **quiet)
    try:
        yield _cpus(ray)
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """Refuse a HOST:PORT where nothing listens: Ray itself would retry for minutes."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # "auto", "ray://...": Ray resolves these itself
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(f"Ray cluster at {address}: nothing answers there ({reason})") from None


def _cpus(ray: Any) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
