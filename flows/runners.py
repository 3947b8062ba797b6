"""The data stages' parts as Prefect task runs on a Dask or Ray cluster (``executor: prefect-dask | prefect-ray``).

A flow run opens the configured Prefect task runner once (``parts_executor``): ``prefect_dask.DaskTaskRunner``
on a private ``LocalCluster`` (127.0.0.1, one single-threaded worker process per core) or on the cluster at
``executor_address``; or ``prefect_ray.RayTaskRunner``. While it is open, every ``map_parts`` / dedup signing
batch of a stage is submitted to that runner as one ``part_task`` run: the parts run on the cluster's workers
and show up in Prefect as task runs (children of the stage's task run) with their own state, duration and
logs. Results come back in part order, so the artifacts are the same as on any other executor.

The stage tasks themselves run in the flow process (they are called, not submitted): the flow process
assembles each artifact and alone writes the lineage DuckDB file; workers only write Parquet fragments.

How Prefect runs a task submitted from inside a running task: ``TaskRunner.submit`` serializes the current
flow-run, task-run and settings contexts with the task (``prefect.context.serialize_context``); the worker
hydrates them and runs ``run_task_sync``, so the part's task run belongs to the flow run and has the stage task
as parent. Workers reach the Prefect API through the serialized ``PREFECT_API_URL``; a flow run without one
uses a temporary server in its own process, whose address ``_api_for_workers`` hands to the workers (else
every worker process would start a temporary server of its own and record its task runs there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, SettingsContext, get_settings_context
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner
from pydantic import PrivateAttr

from tasks.config import PipelineConfig
from tasks.parts import (
    PartExecutor,
    bounded_ordered,
    default_workers,
    engine_of,
    executor_for,
    local_cluster_kwargs,
    missing_extra,
    use_executor,
)

P = TypeVar("P")
R = TypeVar("R")

PREFECT_EXECUTORS = ("prefect-dask", "prefect-ray")


@task(name="part", task_run_name="{label}", persist_result=False, cache_policy=NO_CACHE)
def part_task(fn: Callable[[P], R], part: P, label: str) -> R:
    """One part of a data stage. Not cached or persisted: the stage's artifact is what Prefect caches."""
    return fn(part)


def part_label(fn: Callable, index: int) -> str:
    """``ingest_part-3``: the part function's name (through ``functools.partial``) and the part's index."""
    inner = getattr(fn, "func", fn)
    return f"{getattr(inner, '__name__', 'part')}-{index}"


@contextmanager
def _api_for_workers() -> Iterator[None]:
    """Point submitted tasks at this process's temporary Prefect server when no ``PREFECT_API_URL`` is set."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the process's temporary server (a singleton), started by the flow run
    with temporary_settings({PREFECT_API_URL: server.api_url}) if server.running else nullcontext():
        yield


class _SettingsSerializedOnce(SettingsContext):
    """The current settings, serialized for the workers once per run instead of once per part.

    ``TaskRunner.submit`` sends the serialized settings with every task; in prefect 3.9 serializing them walks the
    whole settings model (≈0.1–0.4 s, most of a part's submission cost, measured by benchmarks/part_overhead.py).
    Settings do not change while the parts of a flow run are submitted, so one serialization serves them all.
    """

    _serialized: dict[str, Any] | None = PrivateAttr(None)

    def serialize(self, include_secrets: bool = True) -> dict[str, Any]:
        if self._serialized is None:
            self._serialized = super().serialize(include_secrets=include_secrets)
        return self._serialized

    @classmethod
    def of_current(cls) -> _SettingsSerializedOnce:
        current = get_settings_context()
        return cls(profile=current.profile, settings=current.settings)


class TaskRunnerExecutor:
    """A ``PartExecutor`` that submits each part as a ``part_task`` run to a started Prefect task runner."""

    def __init__(self, runner: TaskRunner, name: str) -> None:
        self.runner = runner
        self.name = name

    def _submit(self, fn: Callable[[P], R], part: P, index: int) -> PrefectFuture[R]:
        parameters = {"fn": fn, "part": part, "label": part_label(fn, index)}
        if type(self.runner).__name__ != "DaskTaskRunner":
            return self.runner.submit(part_task, parameters)
        # DaskTaskRunner.submit, minus Dask's hashing of the arguments (pure=True): parts are never identical
        # tasks, and hashing the serialized contexts was ≈40% of a part's submission cost.
        from prefect_dask.task_runners import PrefectDaskFuture

        future = self.runner.client.submit(part_task, parameters=parameters, return_type="state", pure=False)
        return PrefectDaskFuture(wrapped_future=future, task_run_id=future.task_run_id)

    def map(self, fn: Callable[[P], R], parts: Sequence[P]) -> list[R]:
        futures = [self._submit(fn, part, i) for i, part in enumerate(parts)]
        return [future.result() for future in futures]  # raises the first failed part's exception, in order

    def imap(self, fn: Callable[[P], R], items: Iterable[P], window: int) -> Iterator[R]:
        return bounded_ordered(lambda i, item: self._submit(fn, item, i), lambda f: f.result(), items, window)


def task_runner_for(cfg: PipelineConfig) -> TaskRunner:
    """The Prefect task runner ``cfg.executor`` names, not yet started (enter it to start it)."""
    engine = engine_of(cfg.executor)
    if engine == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as err:
            raise missing_extra("dask", err) from err
        if cfg.executor_address:
            return DaskTaskRunner(address=cfg.executor_address)
        return DaskTaskRunner(cluster_kwargs=local_cluster_kwargs(cfg.workers))
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as err:
        raise missing_extra("ray", err) from err
    if cfg.executor_address:
        return RayTaskRunner(address=cfg.executor_address)
    return RayTaskRunner(init_kwargs={"num_cpus": default_workers(cfg.workers), "include_dashboard": False})


def _flow_runner_of_kind(cfg: PipelineConfig) -> TaskRunner | None:
    """The flow run's own task runner when it already is the configured kind (``flow.with_options(task_runner=…)``)."""
    context = FlowRunContext.get()
    runner = getattr(context, "task_runner", None)
    kind = {"dask": "DaskTaskRunner", "ray": "RayTaskRunner"}[engine_of(cfg.executor)]
    return runner if runner is not None and type(runner).__name__ == kind else None


@contextmanager
def parts_executor(cfg: PipelineConfig) -> Iterator[PartExecutor | None]:
    """Where the parts of every stage run inside this block of a flow run: ``cfg.executor``, opened once.

    ``prefect-dask`` / ``prefect-ray``: a Prefect task runner (the flow's own when it already is one of that
    kind); the other executors: ``tasks.parts.executor_for`` (a process pool, or a plain Dask/Ray client).
    """
    if cfg.executor not in PREFECT_EXECUTORS:
        with executor_for(cfg) as executor:
            yield executor
        return
    runner = _flow_runner_of_kind(cfg)
    with (
        _api_for_workers(),
        _SettingsSerializedOnce.of_current(),
        nullcontext(runner) if runner is not None else task_runner_for(cfg) as started,
        use_executor(TaskRunnerExecutor(started, cfg.executor)) as executor,
    ):
        yield executor
