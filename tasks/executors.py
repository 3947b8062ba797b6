"""Where a stage's parts run: this machine's process pool, or an existing Dask or Ray cluster.

The data stages split their input into parts sized by bytes (``tasks.parallel``) and hand them to
``map_parts`` / ``imap_parts``. Those run on the *active* executor: none (the default) means a local process
pool; ``use_executor`` activates a cluster executor for a block of code. ``run_stage`` activates the one the
pipeline configuration names (``executor: local | dask | ray``), so stage functions never know which engine
runs their parts; in a Prefect flow run ``flows.runners`` activates a Prefect task runner for ``prefect-dask`` /
``prefect-ray`` (each part a task run); this module stays Prefect-free. Results always come back in part order,
so artifacts do not depend on the engine.

Part functions and parts must be picklable, and every worker must see the paths in them (a shared file
system, or URIs such as ``s3://``). Workers write Parquet fragments only; the flow process alone writes the
lineage DuckDB file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
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
    from tasks.parallel import default_workers

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
        pending: list[Any] = []
        for item in items:
            pending.append(self.client.submit(fn, item, pure=False))
            if len(pending) >= window:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()

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
        pending: list[Any] = []
        for item in items:
            pending.append(remote.remote(item))
            if len(pending) >= window:
                yield self.ray.get(pending.pop(0))
        for ref in pending:
            yield self.ray.get(ref)

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
