"""The ``nightly-refresh`` flow: the pipeline again on the current sources, plus the document diff in lineage.

Stages are content-addressed and the ingest fingerprint includes a snapshot of the sources (paths, sizes,
mtimes), so with no source change every stage is served from cache and the refresh only records a zero diff.
A changed source reruns ingest and whatever its output change reaches downstream.
"""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import Field

from flows.pipeline import flow_run_name_for, pipeline
from storage.artifacts import ArtifactStore
from storage.lineage import LineageStore
from storage.lineage_queries import LineageQueries
from tasks.config import PipelineConfig


def refresh_diff(lineage: LineageStore, previous: str | None, run_id: str) -> list[dict]:
    """Per source: documents added/removed/changed/unchanged since ``previous`` (everything added without one)."""
    if previous is not None:
        return LineageQueries(lineage).diff(previous, run_id)["sources"]
    counts = lineage.query(
        "SELECT source, count(*) AS added FROM read_parquet(?) GROUP BY source ORDER BY source",
        [lineage.ledger_files(run_id, ("ingest",))],
    )
    return [{"source": c["source"], "added": c["added"], "removed": 0, "changed": 0, "unchanged": 0} for c in counts]


def _refresh_run_name() -> str:
    return flow_run_name_for("refresh")


@flow(name="nightly-refresh", flow_run_name=_refresh_run_name, persist_result=True, log_prints=True)
def nightly_refresh(
    config: PipelineConfig = PipelineConfig(),
    train_steps: Annotated[
        int | None,
        Field(ge=1, description="Training budget (optimizer steps) for this refresh; default: config.train.max_steps."),
    ] = None,
) -> dict[str, Any]:
    """Refresh the corpus and model from the current sources; record per-source documents added/removed/changed."""
    logger = get_run_logger()
    lineage = LineageStore(ArtifactStore(config.root).lineage_path)
    previous = lineage.latest_completed_run(config.name)
    if train_steps is not None:
        config = config.model_copy(update={"train": config.train.model_copy(update={"max_steps": train_steps})})
    result = pipeline(config=config)
    run_id = result["run_id"]
    diff = refresh_diff(lineage, previous, run_id)
    lineage.record_refresh_diff(run_id, previous, diff)
    rebuilt = [r["stage"] for r in lineage.stage_runs(run_id) if r["status"] == "completed"]
    create_table_artifact(key="refresh-diff", table=diff, description=f"documents per source vs run {previous}")
    changes = sum(r["added"] + r["removed"] + r["changed"] for r in diff)
    logger.info(f"refresh {run_id} vs {previous}: {changes} documents changed; rebuilt stages: {rebuilt or 'none'}")
    return result | {"previous_run_id": previous, "diff": diff, "rebuilt": rebuilt}
