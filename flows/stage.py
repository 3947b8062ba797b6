"""The ``stage`` flow: rerun one stage of a recorded run, from the configuration and inputs lineage kept for it."""

from __future__ import annotations

import json
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.parameters import UiValue, form_field
from flows.pipeline import run_stages
from flows.runners import parts_executor
from storage.artifacts import ArtifactStore, Manifest
from storage.lineage import LineageStore
from tasks.config import PipelineConfig, validated
from tasks.run_recorder import RunRecorder
from tasks.stages import UPSTREAM, StageName


def open_lineage(root: str) -> LineageStore:
    store = ArtifactStore(root)
    if not store.lineage_path.exists():
        raise FileNotFoundError(f"no lineage DB at {store.lineage_path}: is --root the pipeline's data root?")
    return LineageStore(store.lineage_path)


def recorded_inputs(lineage: LineageStore, run_id: str, name: str, root: str) -> tuple[PipelineConfig, dict]:
    """The configuration run ``run_id`` used and the upstream manifests ``name`` needs, as lineage recorded them."""
    recorded = json.loads(lineage.run(run_id)["config"])
    store = ArtifactStore(root)
    cfg = validated(recorded | {"root": store.location}, f"the configuration run {run_id} recorded")
    artifacts = {a["stage"]: a for a in lineage.run_artifacts(run_id)}
    missing = [u for u in UPSTREAM[name] if u not in artifacts]
    if missing:
        raise LookupError(
            f"run {run_id} has no finished {', '.join(missing)} artifact to feed {name!r}; "
            f"rerun it first: tokenmill stage {missing[0]} --run {run_id} --root {root}"
        )
    inputs = {u: _recorded_manifest(store, artifacts[u]).model_dump() for u in UPSTREAM[name]}
    return cfg, inputs


def _recorded_manifest(store: ArtifactStore, artifact: dict) -> Manifest:
    """A recorded artifact's manifest, from the root it was published to (a remote root included)."""
    manifest = store.load(artifact["stage"], artifact["fingerprint"])
    if manifest is None:
        raise FileNotFoundError(
            f"{artifact['stage']} artifact {artifact['fingerprint']} is gone from {artifact['uri']}; rerun that stage"
        )
    return manifest


def _stage_run_name() -> str:
    params = flow_run.get_parameters()
    return f"stage-{params.get('name')}-of-{params.get('run_id')}"


@flow(name="stage", flow_run_name=_stage_run_name, persist_result=True, log_prints=True)
def stage(
    name: Annotated[StageName, form_field("Stage", "The stage to rerun.")],
    run_id: Annotated[
        str, form_field("Lineage run", "The lineage run whose inputs to use (see `tokenmill runs`).", min_length=1)
    ],
    root: Annotated[
        str, UiValue, form_field("Data root", "Data root holding lineage.duckdb.", min_length=1)
    ] = "./data",
    force: Annotated[bool, UiValue, form_field("Recompute", "Recompute even if the stage's artifact exists.")] = False,
) -> dict[str, Any]:
    """Rerun one stage of a recorded run from the inputs recorded in lineage; the attempt is added to that run."""
    lineage = open_lineage(root)
    cfg, inputs = recorded_inputs(lineage, run_id, name, root)
    get_run_logger().info(f"rerunning {name} of run {run_id} from {', '.join(inputs) or 'its sources'}")
    with parts_executor(cfg):
        manifests = run_stages(
            cfg, (name,), run_id, [name] if force else [], RunRecorder(lineage, run_id), manifests=inputs
        )
    return {"run_id": run_id, "stage": name, "artifact": manifests[name]["path"]}
