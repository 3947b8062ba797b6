"""The ``pipeline`` flow: every stage a Prefect task with retries and a cache key equal to its fingerprint.

Results (the stage manifests, small JSON) are persisted under ``<root>/.prefect-results``, so rerunning the
flow serves finished stages from cache and a changed parameter reruns exactly the stages downstream of it.
The flow process alone writes the lineage DuckDB file.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.concurrency.sync import concurrency
from prefect.context import TaskRunContext
from prefect.exceptions import ExternalSignal
from prefect.runtime import flow_run
from prefect.states import State

from flows.parameters import (
    ConfigParam,
    RootParam,
    SeedParam,
    SourcesParam,
    TrainStepsParam,
    UiValue,
    form_field,
    hydrate_ui_value,
    resolve_run_config,
)
from flows.progress import StageEvent, publish
from flows.runners import parts_executor
from storage.artifacts import ArtifactStore, CorruptArtifactError, Manifest, StageKey
from storage.lineage import LineageStore
from tasks.config import PipelineConfig
from tasks.errors import UserError, is_retryable
from tasks.preflight import preflight
from tasks.reporting.report import publish_run_report, render_run_markdown
from tasks.run_recorder import RunRecorder
from tasks.stages import STAGES, UPSTREAM, StageName, cache_key, data_version, run_stage, stage_key


def _manifests(inputs: dict[str, dict]) -> dict[str, Manifest]:
    return {k: Manifest.model_validate(v) for k, v in inputs.items()}


def _stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """The stage's fingerprint (computed once, in the flow process, and passed in), scoped to its data root."""
    cfg = parameters["cfg"]
    root = cfg.root if isinstance(cfg, PipelineConfig) else cfg["root"]
    return cache_key(StageKey.model_validate(parameters["key"]), root)


ForceParam = Annotated[
    list[StageName] | None,
    UiValue,
    form_field(
        "Recompute stages",
        "Stages to rebuild even when their artifact is cached; later stages rebuild only if its output changes.",
    ),
]


def stage_summary_markdown(manifest: Manifest, reused: bool) -> str:
    """A stage's Prefect summary: where its artifact is, its counts and (for data stages) its drop reasons."""
    rows = "\n".join(f"| {r['count']} | {r['value']} |" for r in counts_table(manifest.counts))
    text = (
        f"# {manifest.stage}{' (cached)' if reused else ''}\n\n`{manifest.location}`\n\n"
        f"fingerprint `{manifest.fingerprint}`, content hash `{manifest.content_hash[:16]}…`, "
        f"{len(manifest.files)} files, {manifest.elapsed_s:.1f} s\n\n| count | value |\n|---|---|\n{rows}\n"
    )
    return text


def counts_line(name: str, counts: dict[str, Any]) -> str:
    """One log line a person reads: documents in / kept / dropped per reason, or a stage's headline numbers."""
    if "docs_in" in counts:
        dropped = counts.get("dropped") or {}
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1]))
        return (
            f"{name}: {counts['docs_in']:,} documents in, {counts.get('kept', 0):,} kept, "
            f"{sum(dropped.values()):,} dropped{f' ({reasons})' if reasons else ''}"
        )
    splits = [(k, v) for k, v in counts.items() if isinstance(v, dict) and "loss" in v and v.get("tokens")]
    if splits:
        return f"{name}: " + "; ".join(
            f"{split} loss {m['loss']:.4f}, perplexity {m['perplexity']:.2f}, bits/byte {m['bits_per_byte']:.4f}"
            for split, m in splits
        )
    return f"{name}: " + ", ".join(f"{r['count']} {r['value']}" for r in counts_table(counts)[:6])


GPU_CONCURRENCY_LIMIT = "gpu"
CPU_TRAIN_LIMIT = "cpu-train"
ARTIFACT_UPDATE_EVERY_S = 2.0


def retry_unless_unrecoverable(task, task_run, state: State) -> bool:
    """Retry a failed stage unless its error says a retry cannot help (``retryable = False``, e.g. first-step OOM)."""
    try:
        state.result()
    except Exception as err:  # noqa: BLE001 - any stage error; only its retryable flag matters
        return is_retryable(err)
    return True


def uses_gpu(name: str, cfg: PipelineConfig) -> bool:
    """Whether this stage will run on CUDA (only training does)."""
    if name != "train" or cfg.train.device == "cpu":
        return False
    import torch

    return cfg.train.device == "cuda" or torch.cuda.is_available()


def train_concurrency() -> int:
    """Training jobs at once on CPU (``TOKENMILL_TRAIN_CONCURRENCY``, default 1) when the ``cpu-train`` limit is
    created: training takes every core, so two at once only slow each other down."""
    return int(os.environ.get("TOKENMILL_TRAIN_CONCURRENCY", "1"))


def training_slot(cfg: PipelineConfig, cpu_slots: int | None = None):
    """A slot of the ``gpu`` limit when training on CUDA, else of the ``cpu-train`` limit (``cpu_slots`` wide,
    default ``train_concurrency()``, when absent); an operator may change either in the UI."""
    if uses_gpu("train", cfg):
        return concurrency_slot(GPU_CONCURRENCY_LIMIT, 1)
    return concurrency_slot(CPU_TRAIN_LIMIT, cpu_slots or train_concurrency())


def _training_slot(name: str, cfg: PipelineConfig):
    return training_slot(cfg) if name == "train" else nullcontext()


def ensure_limit(limit_name: str, limit: int) -> int:
    """Create the global concurrency limit ``limit_name`` with ``limit`` slots if absent; returns its width now
    (an operator may have changed it in the UI)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(limit_name).limit
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit_name, limit=limit))
            return limit


def concurrency_slot(limit_name: str, limit: int):
    """Hold one slot of a global concurrency limit, creating it with ``limit`` slots if absent."""
    ensure_limit(limit_name, limit)
    return concurrency(limit_name, occupy=1, strict=True)


def progress_reporter(name: str) -> Callable[[float, str], None]:
    """A ``ctx.progress`` callback that keeps one Prefect progress artifact per stage run up to date and tells
    this process's listeners (``tokenmill run``'s progress bars)."""
    artifact_id = None
    last_update = 0.0

    def report(fraction: float, message: str) -> None:
        nonlocal artifact_id, last_update
        publish(StageEvent(name, "progress", fraction, message))
        if time.monotonic() - last_update < ARTIFACT_UPDATE_EVERY_S and fraction < 1:
            return  # the server sees at most one update per interval; the listeners see every one
        last_update = time.monotonic()
        percent = round(100 * min(max(fraction, 0.0), 1.0), 1)
        try:
            if artifact_id is None:
                artifact_id = create_progress_artifact(percent, key=f"{name}-progress", description=message)
            else:
                update_progress_artifact(artifact_id, percent, description=message)
        except Exception as err:  # noqa: BLE001 - progress display must never fail the stage
            get_run_logger().warning(f"{name}: could not update the progress artifact: {err}")

    return report


@task(
    retries=1,
    retry_delay_seconds=1,
    retry_condition_fn=retry_unless_unrecoverable,
    cache_key_fn=_stage_cache_key,
    persist_result=True,
    result_serializer="json",
)
def stage_task(
    name: str, cfg: PipelineConfig, inputs: dict[str, dict], key: dict, run_id: str, force: bool = False
) -> dict:
    """Run one stage through the artifact store and publish a markdown summary to Prefect.

    ``key`` is the stage's ``StageKey`` (parameters and inputs), computed once by the flow for the cache key."""
    logger = get_run_logger()
    with _training_slot(name, cfg):
        manifest, reused = run_stage(
            name,
            cfg,
            _manifests(inputs),
            key=StageKey.model_validate(key),
            run_id=run_id,
            force=force,
            log=logger.info,
            progress=progress_reporter(name),
        )
    logger.info(f"{name}: {'reused' if reused else 'built'} {manifest.location}")
    logger.info(counts_line(name, manifest.counts))
    create_markdown_artifact(
        key=f"{name}-summary", markdown=stage_summary_markdown(manifest, reused), description=f"{name} stage"
    )
    create_table_artifact(key=f"{name}-counts", table=counts_table(manifest.counts), description=f"{name} counts")
    return manifest.model_dump()


def counts_table(counts: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    """A stage's counts as table rows, nested counts (drop reasons, evaluation metrics per split) as dotted names."""
    rows: list[dict[str, Any]] = []
    for key, value in counts.items():
        if isinstance(value, dict):
            rows += counts_table(value, f"{prefix}{key}.")
        elif isinstance(value, bool | int | float | str) or value is None:
            rows.append({"count": f"{prefix}{key}", "value": round(value, 6) if isinstance(value, float) else value})
    return rows


def lineage_run_id(lineage: LineageStore) -> str:
    """The lineage run id; a retried flow run (same Prefect id) continues the lineage run it started."""
    flow_run_id = flow_run.get_id()
    if flow_run_id and (existing := lineage.run_for_flow_run(str(flow_run_id))):
        return existing
    return f"{datetime.now(UTC):%Y%m%d}-{str(flow_run_id or 'local')[:8]}"


def flow_run_name_for(kind: str = "") -> str:
    """``<config name>[-kind]-data-<data version>-<UTC time>``: what ran, on which data, when; a retried flow run
    keeps the name it started with."""
    if flow_run.name and RUN_NAME.search(flow_run.name):  # named by an earlier attempt of this flow run
        return flow_run.name
    try:
        cfg = run_config(flow_run.get_parameters())
        name, version = cfg.name, data_version(cfg)
    except Exception:  # noqa: BLE001 - naming must never fail a run; validation reports bad parameters
        name, version = "pipeline", "unknown"
    return f"{name}{'-' + kind if kind else ''}-data-{version}-{datetime.now(UTC):%Y%m%d-%H%M%S}"


RUN_NAME = re.compile(r"-data-([0-9a-f]+|unknown)-\d{8}-\d{6}$")
RUN_FORM = ("config", "root", "seed", "train_steps", "sources")


def deployment_defaults() -> dict[str, Any]:
    """The default parameters of the deployment this flow run belongs to ({} outside a deployment).

    (``prefect.runtime.deployment.parameters`` gives the flow run's own parameters, not these.)"""
    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment

    if not deployment.id:
        return {}
    with get_client(sync_client=True) as client:
        return client.read_deployment(deployment.id).parameters or {}


def run_config(parameters: dict[str, Any]) -> PipelineConfig:
    """The configuration a flow run's short-form parameters describe; an unset one takes the deployment's default
    (a schedule made in the UI may leave fields unset that the deployment sets)."""
    values = {k: hydrate_ui_value(parameters.get(k)) for k in RUN_FORM}
    defaults = deployment_defaults() if None in values.values() else {}
    values = {k: v if v is not None else hydrate_ui_value(defaults.get(k)) for k, v in values.items()}
    return resolve_run_config(values.pop("config"), **values)


def _flow_run_name() -> str:
    return flow_run_name_for()


def run_stages(
    cfg: PipelineConfig,
    stages: tuple[str, ...],
    run_id: str,
    force: list[str],
    record: RunRecorder,
    manifests: dict[str, dict] | None = None,
) -> dict[str, dict]:
    """Run ``stages`` in order as Prefect tasks, recording each outcome in lineage."""
    manifests = dict(manifests or {})
    store = ArtifactStore(cfg.root)
    logger = get_run_logger()
    for name in stages:
        started = datetime.now(UTC)
        publish(StageEvent(name, "start"))
        inputs = {u: manifests[u] for u in UPSTREAM[name]}
        key = stage_key(name, cfg, _manifests(inputs)).model_dump()
        state = _run_stage_task(name, cfg, inputs, key, run_id, name in force, store, record, started)
        manifest = Manifest.model_validate(state.result())
        cached = state.name == "Cached" or manifest.run_id != run_id
        if cached:
            try:  # a cache hit skips the stage body, so check here that its files are still what was published
                store.verify(manifest, deep=cfg.verify_cached)
                logger.info(f"{name}: cached, {manifest.location}")
            except CorruptArtifactError as err:
                logger.warning(f"{err}: rebuilding {name} by rerunning it")
                state = _run_stage_task(name, cfg, inputs, key, run_id, True, store, record, started)
                manifest, cached = Manifest.model_validate(state.result()), False
        record.stage_done(name, started, manifest, cached)
        publish(StageEvent(name, "done", 1.0, "cached" if cached else f"built in {manifest.elapsed_s:.1f} s"))
        manifests[name] = manifest.model_dump()
    return manifests


def _run_stage_task(
    name: str,
    cfg: PipelineConfig,
    inputs: dict[str, dict],
    key: dict,
    run_id: str,
    force: bool,
    store: ArtifactStore,
    record: RunRecorder,
    started: datetime,
) -> State:
    """Run one stage task; on failure record it in lineage and fail the flow with the stage's exception."""
    task_fn = stage_task.with_options(
        name=name, task_run_name=name, result_storage=store.results_dir, refresh_cache=force or None
    )
    try:
        state: State = task_fn(name, cfg, inputs, key, run_id, force, return_state=True)
    except (KeyboardInterrupt, ExternalSignal) as err:  # Ctrl-C, or SIGTERM (Prefect's TerminationSignal)
        record.stage_failed(name, started, err)  # recorded as cancelled; the checkpoints stay for a rerun
        raise
    if state.is_failed() or state.is_crashed():
        publish(StageEvent(name, "done", 0.0, "failed"))
        record.stage_failed(name, started, _exception_of(state))
        state.result()  # re-raises the stage's exception and fails the flow
    return state


def publish_report(
    store: ArtifactStore, lineage: LineageStore, run_id: str, pipeline_name: str, manifests: dict[str, dict]
) -> dict[str, Path]:
    """Write the run report (Markdown + self-contained HTML), record it in lineage, publish it to Prefect."""
    run, paths = publish_run_report(store, lineage, run_id, pipeline_name, _manifests(manifests))
    create_markdown_artifact(
        key="evaluation-report",
        markdown=render_run_markdown(run, embed_images=True),
        description=f"run report (also as one HTML file: {paths['html']})",
    )
    return paths


def stage_counts_table(lineage: LineageStore, run_id: str) -> list[dict[str, Any]]:
    """One row per stage attempt of a run: status, time and the document counts."""
    rows = []
    for r in lineage.stage_runs(run_id):
        counts = json.loads(r["counts"]) if r["counts"] else {}
        rows.append(
            {
                "stage": r["stage"],
                "attempt": r["attempt"],
                "status": r["status"],
                "seconds": round(r["elapsed_s"] or 0.0, 2),
                "docs_in": counts.get("docs_in"),
                "kept": counts.get("kept"),
                "dropped": sum((counts.get("dropped") or {}).values()),
            }
        )
    return rows


def _exception_of(state: State) -> BaseException:
    try:
        state.result()
    except BaseException as err:  # noqa: BLE001 - we report whatever the stage raised
        return err
    return RuntimeError(f"stage ended in state {state.name}")


def close_crashed_attempts(record: RunRecorder) -> None:
    """On a retried flow run: task runs an ended process left "Running" are set Crashed, and lineage gets the
    crashed attempt it never recorded (the process died before it could)."""
    if flow_run.run_count <= 1:
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        leftovers = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.get_id()])),
            task_run_filter=TaskRunFilter(
                state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))
            ),
        )
        for task_run in leftovers:
            message = "the process running this attempt ended before it finished (crash or kill)"
            client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
            stage = stage_of_task_run(task_run.name)
            if stage is not None:
                started = task_run.start_time or task_run.expected_start_time or datetime.now(UTC)
                record.lineage.record_stage(record.run_id, stage, "crashed", started, error=message)
            get_run_logger().warning(f"{stage or task_run.name}: the previous attempt's task run is marked Crashed")


def stage_of_task_run(name: str) -> str | None:
    """The stage a task run ran: its name, or ``<stage>-<n>`` when the process died before Prefect gave the run
    its templated name."""
    for candidate in (name, name.rsplit("-", 1)[0]):
        if candidate in STAGES:
            return candidate
    return None


def run_pipeline(config: PipelineConfig, force: list[str] | None = None) -> dict[str, Any]:
    """Every stage of ``config`` as tasks of the current flow run, then the run report (pipeline and refresh)."""
    force = force or []
    unknown = sorted(set(force) - set(STAGES))
    if unknown:
        raise UserError(f"force names unknown stages {unknown}; stages are {list(STAGES)}")
    preflight(config)  # every path the configuration names, before any stage (a deployment skips the CLI's check)
    store = ArtifactStore(config.root)
    lineage = LineageStore(store.lineage_path)
    run_id = lineage_run_id(lineage)
    get_run_logger().info(f"lineage run {run_id} in {store.lineage_path}")
    record = RunRecorder(lineage, run_id, backup=store.backup_lineage)
    record.start(config, str(flow_run.get_id()))
    close_crashed_attempts(record)
    with parts_executor(config):  # one task runner / Dask / Ray client (or private cluster) for the whole run
        manifests = run_stages(config, STAGES, run_id, force, record)
    report = publish_report(store, lineage, run_id, config.name, manifests)
    record.finish()
    create_table_artifact(key="stage-counts", table=stage_counts_table(lineage, run_id), description="per stage")
    return {
        "run_id": run_id,
        "root": store.location,
        "lineage": str(store.lineage_path),
        "artifacts": {k: v.get("uri") or v["path"] for k, v in manifests.items()},
        "report": str(report["html"]),
    }


@flow(name="pipeline", flow_run_name=_flow_run_name, persist_result=True, log_prints=True)
def pipeline(
    config: ConfigParam = None,
    root: RootParam = None,
    seed: SeedParam = None,
    train_steps: TrainStepsParam = None,
    sources: SourcesParam = None,
    force: ForceParam = None,
) -> dict[str, Any]:
    """Raw text → cleaned, deduplicated corpus → tokenizer → token shards → trained and evaluated model."""
    cfg = run_config({"config": config, "root": root, "seed": seed, "train_steps": train_steps, "sources": sources})
    return run_pipeline(cfg, force)
