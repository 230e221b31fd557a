"""Executors: run the per-item stages over a stream of tasks, yielding outcomes in task order.

`execute` picks one from `ExecutorSpec.kind`: the local process pool below, or Ray
(`ray_executor.py`). Both keep a bounded window of work in flight, so memory stays flat however
large the build, and neither changes an output byte: the writer places outcomes by position.
"""

from __future__ import annotations

import ctypes
import itertools
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

from .stages import BuildContext, Outcome, Task, run_task

EXECUTORS = ("local", "ray")

_worker_context: BuildContext | None = None


@dataclass(frozen=True)
class ExecutorSpec:
    """Where the stages run. None of this enters the build fingerprint: it changes no byte."""

    kind: str = "local"  # one of EXECUTORS
    workers: int = 1  # local: processes; ray: CPUs of the instance it starts
    ray_address: str | None = None  # ray: a cluster to join (None: RAY_ADDRESS, else start one)
    rows_per_shard: int = 1000  # ray: the tasks of one shard travel as one Ray task


def execute(tasks: Iterable[Task], ctx: BuildContext, spec: ExecutorSpec) -> Iterator[Outcome]:
    """Run `tasks` on the executor `spec` names, yielding outcomes in task order."""
    if spec.kind == "ray":
        from .ray_executor import run_on_ray

        return run_on_ray(tasks, ctx, spec)
    return run_tasks(tasks, ctx, spec.workers)


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel kill this worker when the build process dies, even by SIGKILL, so
    no worker is left behind blocked on its task pipe."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _init_worker(ctx: BuildContext, parent: int) -> None:
    global _worker_context
    _die_with_parent(parent)
    _worker_context = ctx
    ctx.vocab  # load the vocabulary once per worker, not per task  # noqa: B018


def _run_chunk(tasks: list[Task]) -> list[Outcome]:
    assert _worker_context is not None
    return [run_task(task, _worker_context) for task in tasks]


def run_tasks(
    tasks: Iterable[Task], ctx: BuildContext, workers: int, chunk_size: int = 4
) -> Iterator[Outcome]:
    """Run `tasks` with `workers` processes (1: in this process), yielding outcomes in order."""
    if workers <= 1:
        for task in tasks:
            yield run_task(task, ctx)
        return
    # fork: workers inherit the loaded modules, so they start in milliseconds.
    context = multiprocessing.get_context("fork")
    window = workers * 4
    initargs = (ctx, os.getpid())
    with ProcessPoolExecutor(workers, context, initializer=_init_worker, initargs=initargs) as pool:
        pending: deque[Future[list[Outcome]]] = deque()
        iterator = iter(tasks)
        while chunk := list(itertools.islice(iterator, chunk_size)):
            pending.append(pool.submit(_run_chunk, chunk))
            if len(pending) >= window:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
