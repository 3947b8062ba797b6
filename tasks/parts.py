"""Where a stage's parts run: this machine's process pool, or an existing Dask or Ray cluster.

The data stages split their input into parts sized by bytes (``balanced_groups``) and hand them to
``map_parts`` / ``imap_parts``. Those run on the *active* executor: none (the default) means a local process
pool; ``use_executor`` activates a cluster executor for a block of code. ``run_stage`` activates the one the
pipeline configuration names (``executor: local | dask | ray``), so stage functions never know which engine
runs their parts; in a Prefect flow run ``flows.runners`` activates a Prefect task runner for ``prefect-dask`` /
``prefect-ray`` (each part a task run); this module stays Prefect-free. Results always come back in part order,
so artifacts do not depend on the engine.

Part functions and parts must be picklable, and every worker must see the paths in them (a shared file
system, or URIs such as ``s3://``). On an object-store root the parts read and upload by URI themselves
(``storage.part_outputs``), so workers share nothing with the flow process but the store; the flow process
alone writes the lineage DuckDB file.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from tasks.config import PipelineConfig

P = TypeVar("P")
R = TypeVar("R")


class PartExecutor(Protocol):
    """Runs independent parts somewhere and returns their results in part order."""

    name: str

    def map(self, fn: Callable[[P], R], parts: Sequence[P]) -> list[R]: ...

    def imap(self, fn: Callable[[P], R], items: Iterable[P], window: int) -> Iterator[R]:
        """Ordered results with at most ``window`` items in flight (bounded memory for long streams)."""
        ...


def bounded_ordered(
    submit: Callable[[int, P], Any], wait: Callable[[Any], R], items: Iterable[P], window: int
) -> Iterator[R]:
    """Results in item order, with at most ``window`` items submitted and not yet collected (bounded memory).

    The one ordered, bounded map every engine uses: ``submit(index, item)`` returns a handle, ``wait`` its result.
    """
    pending: deque[Any] = deque()
    for i, item in enumerate(items):
        pending.append(submit(i, item))
        if len(pending) >= window:
            yield wait(pending.popleft())
    while pending:
        yield wait(pending.popleft())


def _result(future: Any) -> Any:
    return future.result()


_ACTIVE: ContextVar[PartExecutor | None] = ContextVar("tokenmill_executor", default=None)


def active_executor() -> PartExecutor | None:
    """The cluster executor activated by ``use_executor``, or None (local process pool)."""
    return _ACTIVE.get()


@contextmanager
def use_executor(executor: PartExecutor | None) -> Iterator[PartExecutor | None]:
    """Run the parts of every stage called inside this block on ``executor`` (None: the local pool)."""
    token = _ACTIVE.set(executor)
    try:
        yield executor
    finally:
        _ACTIVE.reset(token)


def missing_extra(engine: str, err: ImportError) -> RuntimeError:
    return RuntimeError(f"executor {engine!r} needs the {engine} extra: pip install 'tokenmill[{engine}]' ({err})")


def local_cluster_kwargs(workers: int | None) -> dict[str, Any]:
    """A private Dask ``LocalCluster``: one single-threaded worker process per core, reachable from 127.0.0.1 only."""
    return {
        "n_workers": default_workers(workers),
        "processes": True,
        "threads_per_worker": 1,
        "host": "127.0.0.1",
        "dashboard_address": None,
    }


class DaskExecutor:
    """Parts as Dask tasks on an existing cluster (``Client.map`` / ``gather``; results in part order)."""

    name = "dask"

    def __init__(self, client: Any) -> None:
        self.client = client

    def map(self, fn: Callable[[P], R], parts: Sequence[P]) -> list[R]:
        futures = self.client.map(fn, list(parts), pure=False)
        return self.client.gather(futures)

    def imap(self, fn: Callable[[P], R], items: Iterable[P], window: int) -> Iterator[R]:
        return bounded_ordered(lambda _, item: self.client.submit(fn, item, pure=False), _result, items, window)

    @classmethod
    @contextmanager
    def connect(cls, address: str | None, workers: int | None = None) -> Iterator[DaskExecutor]:
        """A client of the cluster at ``address``; without one, a private local cluster (127.0.0.1 only)."""
        try:
            from distributed import Client, LocalCluster
        except ImportError as err:
            raise missing_extra("dask", err) from err
        if address:
            with Client(address) as client:
                yield cls(client)
            return
        with LocalCluster(**local_cluster_kwargs(workers)) as cluster, Client(cluster) as client:
            yield cls(client)


class RayExecutor:
    """Parts as Ray tasks (``ray.get`` keeps part order). Untested in CI: a Ray node listens on all interfaces."""

    name = "ray"

    def __init__(self, ray: Any) -> None:
        self.ray = ray

    def _remote(self, fn: Callable) -> Any:
        return self.ray.remote(num_cpus=1)(fn)

    def map(self, fn: Callable[[P], R], parts: Sequence[P]) -> list[R]:
        remote = self._remote(fn)
        return self.ray.get([remote.remote(p) for p in parts])

    def imap(self, fn: Callable[[P], R], items: Iterable[P], window: int) -> Iterator[R]:
        remote = self._remote(fn)
        return bounded_ordered(lambda _, item: remote.remote(item), self.ray.get, items, window)

    @classmethod
    @contextmanager
    def connect(cls, address: str | None, workers: int | None = None) -> Iterator[RayExecutor]:
        """Join the Ray cluster at ``address`` (e.g. ``ray://head:10001`` or ``auto``), else start a local one."""
        try:
            import ray
        except ImportError as err:
            raise missing_extra("ray", err) from err
        started = not ray.is_initialized()
        if started:
            kwargs: dict[str, Any] = {"address": address} if address else {"num_cpus": workers}
            ray.init(include_dashboard=False, **kwargs)
        try:
            yield cls(ray)
        finally:
            if started:
                ray.shutdown()


def engine_of(executor: str) -> str:
    """The cluster engine behind an executor name: ``prefect-dask`` runs on ``dask``, ``prefect-ray`` on ``ray``."""
    return executor.removeprefix("prefect-")


@contextmanager
def executor_for(cfg: PipelineConfig) -> Iterator[PartExecutor | None]:
    """Activate the executor ``cfg`` names for the block, unless one is already active (a flow opened it).

    ``prefect-dask`` / ``prefect-ray`` need a Prefect flow run (``flows.runners`` opens them there); outside one
    (``run_all``, a bare ``run_stage``) the parts go to the same engine directly: same cluster, same artifacts.
    """
    if cfg.executor == "local" or active_executor() is not None:
        yield active_executor()
        return
    engine = DaskExecutor if engine_of(cfg.executor) == "dask" else RayExecutor
    with engine.connect(cfg.executor_address, cfg.workers) as executor, use_executor(executor):
        yield executor


def default_workers(workers: int | None) -> int:
    return max(1, workers or len(os.sched_getaffinity(0)))


def map_parts(
    fn: Callable[[P], R],
    parts: Sequence[P],
    workers: int | None,
    on_done: Callable[[int, int], None] | None = None,
) -> list[R]:
    """``[fn(p) for p in parts]``, on a process pool when there are several parts and workers.

    ``fn`` and the parts must be picklable. Inside ``use_executor``
    the parts run on that cluster instead (``workers`` then only matters for how callers size parts).
    ``on_done(done, total)`` is called as results arrive (in part order), for progress displays.
    """
    if on_done is not None:
        results: list[R] = []
        for result in imap_parts(fn, parts, min(default_workers(workers), max(len(parts), 1)), len(parts) or None):
            results.append(result)
            on_done(len(results), len(parts))
        return results
    executor = active_executor()
    if executor is not None and parts:
        return executor.map(fn, parts)
    n = min(default_workers(workers), len(parts))
    if n <= 1:
        return [fn(p) for p in parts]
    with _local_pool(n) as pool:
        return list(pool.map(fn, parts))


def imap_parts(fn: Callable[[P], R], items: Iterable[P], workers: int | None, window: int | None = None) -> Iterator[R]:
    """``map(fn, items)`` in order with at most ``window`` items in flight (default: two per worker).

    For long streams (dedup's signing batches) whose items should not all be in memory at once; the same
    engines as ``map_parts``.
    """
    executor = active_executor()
    n = default_workers(workers)
    window = window or 2 * n
    if executor is not None:
        yield from executor.imap(fn, items, window)
        return
    if n <= 1:
        yield from map(fn, items)
        return
    with _local_pool(n) as pool:
        yield from bounded_ordered(lambda _, item: pool.submit(fn, item), _result, items, window)


@contextlib.contextmanager
def _local_pool(n: int) -> Iterator[ProcessPoolExecutor]:
    """A process pool on this machine, started with ``forkserver``: forking the (possibly multi-threaded,
    Prefect-running) parent directly can deadlock."""
    context = multiprocessing.get_context("forkserver")
    with _main_without_phantom_file(), ProcessPoolExecutor(max_workers=n, mp_context=context) as pool:
        yield pool


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
