"""``executor: prefect-dask``: every part of a data stage is a Prefect task run on a DaskTaskRunner.

One local Dask cluster of 2 worker processes on 127.0.0.1 serves the module and is closed at its end.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prefect import flow

from flows.pipeline import stage_of_task_run
from flows.runners import parts_executor
from storage.artifacts import ArtifactStore, StageContext
from storage.lineage import LineageStore
from tasks.config import CleanConfig, PipelineConfig, SourceConfig
from tasks.data.clean import clean
from tasks.data.ingest import ingest
from tasks.stages import UPSTREAM, run_stage
from tests.support.corpus import tiny_config, write_prose_jsonl

pytestmark = pytest.mark.prefect
distributed = pytest.importorskip("distributed")
pytest.importorskip("prefect_dask")

DATA_STAGES = ("ingest", "clean", "dedup", "tokenizer", "tokenize")
PART_FUNCTIONS = (
    "ingest_part",
    "write_docs_shard",
    "clean_part",
    "sign_part",
    "band_pairs",
    "write_kept_shard",
    "own_split_part",
    "tokenize_part",
)


def _one_process_hashes(cfg: PipelineConfig) -> dict[str, str]:
    manifests = {}
    for name in DATA_STAGES:
        manifests[name], _ = run_stage(name, cfg, {u: manifests[u] for u in UPSTREAM[name]}, log=lambda m: None)
    return {name: m.content_hash for name, m in manifests.items()}


def _task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _settled_task_runs(flow_run_id, timeout_s: float = 60) -> list:
    """The flow run's task runs once every part's parent task run is on the server too: the server records task
    runs from their events, so a part can be listed before the stage task run that submitted it."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = _task_runs(flow_run_id)
        ids = {r.id for r in runs}
        parents = {p.id for r in runs if _part_name(r) in PART_FUNCTIONS for p in r.task_inputs["__parents__"]}
        if parents <= ids or time.monotonic() > deadline:
            return runs
        time.sleep(1)


def _part_name(task_run) -> str:
    return task_run.name.rsplit("-", 1)[0]


@pytest.mark.slow
def test_pipeline_on_a_dask_task_runner_matches_one_process(
    prefect_harness, dask_cluster, corpus: Path, tmp_path: Path
):
    from flows.pipeline import pipeline

    reference = _one_process_hashes(tiny_config(corpus, tmp_path / "local", workers=1))
    address = dask_cluster.scheduler_address
    cfg = tiny_config(corpus, tmp_path / "dask", executor="prefect-dask", executor_address=address)
    state = pipeline(config=cfg, return_state=True)
    lineage = LineageStore(ArtifactStore(cfg.root).lineage_path)
    recorded = {a["stage"]: a["content_hash"] for a in lineage.run_artifacts(state.result()["run_id"])}
    assert {n: recorded[n] for n in DATA_STAGES} == reference

    runs = _settled_task_runs(state.state_details.flow_run_id)
    # a task run's templated name can reach the server after its first name (``dedup-123``): trace either
    stages = {r.id: stage_of_task_run(r.name) for r in runs if stage_of_task_run(r.name) in DATA_STAGES}
    parts = [r for r in runs if _part_name(r) in PART_FUNCTIONS]
    assert {_part_name(r) for r in parts} == set(PART_FUNCTIONS)
    assert all(r.state_type.value == "COMPLETED" for r in parts)
    parents = {_part_name(r): {stages[p.id] for p in r.task_inputs["__parents__"]} for r in parts}
    assert parents == {
        "ingest_part": {"ingest"},
        "write_docs_shard": {"ingest"},
        "clean_part": {"clean"},
        "sign_part": {"dedup"},
        "band_pairs": {"dedup"},
        "write_kept_shard": {"dedup"},
        "own_split_part": {"tokenize"},
        "tokenize_part": {"tokenize"},
    }
    assert "part_task" in dask_cluster.scheduler.task_prefixes  # the parts reached the Dask scheduler


@flow(name="ingest-and-clean-in-parts")
def _ingest_and_clean(cfg: PipelineConfig, corpus: str, out: str) -> tuple[dict, dict]:
    """Ingest a folder, rewrite it as 3 files of 4 row groups, clean them in 20 KB parts (several parts)."""
    with parts_executor(cfg):
        ctx = StageContext(Path(out, "ingest"), Path(out, "ingest-work"), log=lambda m: None)
        ingest([SourceConfig(name="fan", path=corpus)], ctx, workers=1)
        table = pq.read_table(Path(out, "ingest", "docs"))
        docs = [Path(out, f"raw-{k}.parquet") for k in range(3)]
        for k, path in enumerate(docs):
            pq.write_table(table.slice(40 * k, 40), path, row_group_size=10)
        ctx = StageContext(Path(out, "clean"), Path(out, "clean-work"), log=lambda m: None)
        counts = clean(docs, CleanConfig(min_chars=32), ctx, workers=1, part_bytes=20_000)
    files = {str(p.relative_to(out)): p.read_bytes().hex() for p in sorted(Path(out).rglob("*.parquet"))}
    return files, counts


def test_many_parts_as_task_runs_come_back_in_part_order(prefect_harness, dask_cluster, tmp_path: Path):
    corpus = write_prose_jsonl(tmp_path / "corpus")
    outs = {}
    for executor, address in (("local", None), ("prefect-dask", dask_cluster.scheduler_address)):
        cfg = tiny_config(corpus, tmp_path / "root", executor=executor, executor_address=address)
        state = _ingest_and_clean(cfg, str(corpus), str(tmp_path / executor), return_state=True)
        outs[executor] = state.result()
    assert outs["prefect-dask"] == outs["local"]
    clean_files = [n for n in outs["local"][0] if n.startswith("clean/docs/")]
    parts = [r for r in _task_runs(state.state_details.flow_run_id) if _part_name(r) == "clean_part"]
    assert len(parts) > 2 and len(clean_files) > 2
    executed = dask_cluster.scheduler.task_prefixes["part_task"]
    with distributed.Client(dask_cluster) as client:
        per_worker = client.run(lambda dask_worker: dask_worker.state.executed_count)
    assert len(per_worker) == 2 and all(n > 0 for n in per_worker.values()), (per_worker, executed)


def test_the_configured_task_runner(tmp_path: Path):
    from prefect_dask import DaskTaskRunner

    from flows.runners import task_runner_for

    private = task_runner_for(PipelineConfig(executor="prefect-dask", workers=3))
    assert isinstance(private, DaskTaskRunner) and private.address is None
    assert (
        private.cluster_kwargs | {"n_workers": 3, "host": "127.0.0.1", "threads_per_worker": 1}
        == private.cluster_kwargs
    )
    existing = task_runner_for(PipelineConfig(executor="prefect-dask", executor_address="tcp://10.0.0.5:8786"))
    assert existing.address == "tcp://10.0.0.5:8786" and not existing.cluster_kwargs


def test_outside_a_flow_run_prefect_dask_sends_parts_to_dask_directly(dask_cluster, corpus: Path, tmp_path: Path):
    """``run_all`` / a bare ``run_stage`` have no task runner: the same cluster runs the parts, same artifact."""
    local = tiny_config(corpus, tmp_path / "local", workers=1)
    address = dask_cluster.scheduler_address
    direct = tiny_config(corpus, tmp_path / "direct", executor="prefect-dask", executor_address=address)
    before = dask_cluster.scheduler.task_prefixes.get("ingest_part")
    hashes = [run_stage("ingest", cfg, {}, log=lambda m: None)[0].content_hash for cfg in (local, direct)]
    assert hashes[0] == hashes[1]
    assert before is None and "ingest_part" in dask_cluster.scheduler.task_prefixes
