"""The ``nightly-refresh`` flow: the pipeline again on the current sources, plus the document diff in lineage.

Stages are content-addressed and the ingest fingerprint includes a snapshot of the sources (paths, sizes,
mtimes), so with no source change every stage is served from cache and the refresh only records a zero diff.
A changed source reruns ingest and whatever its output change reaches downstream.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.parameters import ConfigParam, RootParam, TrainStepsParam
from flows.pipeline import flow_run_name_for, run_config, run_pipeline
from storage.artifacts import ArtifactStore
from storage.lineage import LineageStore
from storage.lineage_queries import LineageQueries


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


def refresh_markdown(run_id: str, previous: str | None, diff: list[dict], rebuilt: list[str]) -> str:
    """The refresh report shown in the Prefect UI: documents per source against the previous run, stages rebuilt."""
    lines = [
        f"# Refresh `{run_id}`",
        "",
        f"Compared with run `{previous}`." if previous else "First run of this pipeline: every document is new.",
        "",
        f"Stages rebuilt: {', '.join(rebuilt) if rebuilt else 'none (every stage cached)'}.",
        "",
        "| source | added | removed | changed | unchanged |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['source']} | {r['added']:,} | {r['removed']:,} | {r['changed']:,} | {r['unchanged']:,} |" for r in diff
    ]
    return "\n".join(lines) + "\n"


@flow(name="nightly-refresh", flow_run_name=_refresh_run_name, persist_result=True, log_prints=True)
def nightly_refresh(
    config: ConfigParam = None, root: RootParam = None, train_steps: TrainStepsParam = None
) -> dict[str, Any]:
    """Refresh the corpus and model from the current sources; record per-source documents added/removed/changed.

    The stages run as tasks of this flow run (their logs and artifacts are the refresh's own)."""
    logger = get_run_logger()
    cfg = run_config({"config": config, "root": root, "train_steps": train_steps})
    lineage = LineageStore(ArtifactStore(cfg.root).lineage_path)
    previous = lineage.latest_completed_run(cfg.name)
    result = run_pipeline(cfg)
    run_id = result["run_id"]
    diff = refresh_diff(lineage, previous, run_id)
    lineage.record_refresh_diff(run_id, previous, diff)
    rebuilt = [r["stage"] for r in lineage.stage_runs(run_id) if r["status"] == "completed"]
    create_table_artifact(key="refresh-diff", table=diff, description=f"documents per source vs run {previous}")
    create_markdown_artifact(
        key="refresh-report", markdown=refresh_markdown(run_id, previous, diff, rebuilt), description="refresh"
    )
    changes = sum(r["added"] + r["removed"] + r["changed"] for r in diff)
    logger.info(f"refresh {run_id} vs {previous}: {changes} documents changed; rebuilt stages: {rebuilt or 'none'}")
    return result | {"previous_run_id": previous, "diff": diff, "rebuilt": rebuilt}
