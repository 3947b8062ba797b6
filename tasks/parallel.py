"""Fan a stage's parts out over worker processes; results come back in part order, so outputs stay deterministic."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tasks.executors import active_executor

P = TypeVar("P")
R = TypeVar("R")


def default_workers(workers: int | None) -> int:
    return max(1, workers or len(os.sched_getaffinity(0)))


def map_parts(fn: Callable[[P], R], parts: Sequence[P], workers: int | None) -> list[R]:
    """``[fn(p) for p in parts]``, on a process pool when there are several parts and workers.

    Uses the ``forkserver`` start method: forking the (possibly multi-threaded, Prefect-running) parent
    directly can deadlock. ``fn`` and the parts must be picklable. Inside ``tasks.executors.use_executor``
    the parts run on that cluster instead (``workers`` then only matters for how callers size parts).
    """
    executor = active_executor()
    if executor is not None and parts:
        return executor.map(fn, parts)
    n = min(default_workers(workers), len(parts))
    if n <= 1:
        return [fn(p) for p in parts]
    context = multiprocessing.get_context("forkserver")
    with _main_without_phantom_file(), ProcessPoolExecutor(max_workers=n, mp_context=context) as pool:
        return list(pool.map(fn, parts))


@contextlib.contextmanager
def _main_without_phantom_file() -> Iterator[None]:
    """Workers re-import ``__main__`` from its file; when it has none (``python - < script``), don't try."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    phantom = path is not None and not os.path.exists(path)
    if phantom:
        del main.__file__  # type: ignore[union-attr]
    try:
        yield
    finally:
        if phantom:
            main.__file__ = path  # type: ignore[union-attr]


def balanced_groups(sizes: Sequence[int], target: int, max_items: int) -> list[list[int]]:
    """Split indices 0..n-1 into consecutive groups of about ``target`` total size and at most ``max_items``."""
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, size in enumerate(sizes):
        if current and (total + size > target or len(current) >= max_items):
            groups.append(current)
            current, total = [], 0
        current.append(i)
        total += size
    if current:
        groups.append(current)
    return groups
