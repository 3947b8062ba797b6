"""Operations without a server: the refresh diff, fault counts, stage dependencies, the deployment definitions."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from storage.artifacts import ArtifactStore
from storage.faults import InjectedFault, maybe_fail
from storage.lineage import LineageStore
from tasks.stages import STAGES, UPSTREAM, data_version, downstream, run_stage
from tests.support.corpus import tiny_config


def _record_corpus_run(lineage: LineageStore, run_id: str, cfg) -> None:
    """Ingest and clean the corpus as a completed lineage run (what a refresh diffs against)."""
    lineage.start_run(run_id, cfg.name, cfg.model_dump(), cfg.seed, None)
    ingest, _ = run_stage("ingest", cfg, {})
    clean, _ = run_stage("clean", cfg, {"ingest": ingest})
    for manifest in (ingest, clean):
        lineage.record_stage(run_id, manifest.stage, "completed", datetime.now(UTC), manifest=manifest)
    lineage.finish_run(run_id, "completed")


def test_refresh_diff_counts_added_removed_and_changed_documents_per_source(corpus: Path, tmp_path: Path):
    from flows.refresh import refresh_diff

    cfg = tiny_config(corpus, tmp_path / "root")
    lineage = LineageStore(ArtifactStore(cfg.root).lineage_path)
    _record_corpus_run(lineage, "before", cfg)
    version = data_version(cfg)
    docs = corpus / "docs"
    (docs / "prose_new.txt").write_text("A brand new document about pipelines and lineage.\n" * 4)
    (docs / "prose_01.txt").unlink()
    (docs / "prose_02.txt").write_text("Rewritten prose about careful data engineering.\n" * 4)
    assert data_version(cfg) != version  # the run name's data version follows the sources
    _record_corpus_run(lineage, "after", cfg)

    assert lineage.latest_completed_run(cfg.name, before="after") == "before"
    diff = {row["source"]: row for row in refresh_diff(lineage, "before", "after")}
    assert (diff["docs"]["added"], diff["docs"]["removed"], diff["docs"]["changed"]) == (1, 1, 1)
    assert (diff["records"]["added"], diff["records"]["removed"], diff["records"]["changed"]) == (0, 0, 0)
    lineage.record_refresh_diff("after", "before", list(diff.values()))
    assert [r["source"] for r in lineage.refresh_diffs("after")] == ["docs", "records"]
    first = {row["source"]: row["added"] for row in refresh_diff(lineage, None, "before")}
    assert first["records"] == 12 and first["docs"] > 0  # no previous run: everything is new


def test_fault_fires_the_given_number_of_times_then_lets_retries_pass(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_FAULT_DIR", str(tmp_path / "faults"))
    monkeypatch.setenv("TOKENMILL_FAULT", "dedup:start:2")
    for attempt in (1, 2):
        with pytest.raises(InjectedFault, match=f"{attempt}/2"):
            maybe_fail("dedup", "start")
    maybe_fail("dedup", "start")  # the third attempt passes
    maybe_fail("clean", "start")  # other stages never fail


def test_fault_spec_can_be_armed_through_a_file(tmp_path: Path, monkeypatch):
    spec = tmp_path / "spec"
    monkeypatch.setenv("TOKENMILL_FAULT_DIR", str(tmp_path / "faults"))
    monkeypatch.setenv("TOKENMILL_FAULT", f"@{spec}")
    maybe_fail("train", "start")  # no file: disarmed
    spec.write_text("train:start\n")
    with pytest.raises(InjectedFault):
        maybe_fail("train", "start")
    maybe_fail("train", "start")  # once by default


def test_downstream_follows_the_stage_graph():
    assert downstream("dedup") == ("dedup", "tokenizer", "tokenize", "train", "evaluate", "export")
    assert downstream("train") == ("train", "evaluate", "export")
    assert downstream("evaluate") == ("evaluate",)  # export reads the model, not the evaluation
    assert downstream("ingest") == STAGES
    for stage in STAGES:
        assert all(stage in downstream(u) for u in UPSTREAM[stage])


def test_deployments_cover_pipeline_nightly_and_every_stage(config):
    from deployments.serve import build_deployments

    deployments = {f"{d.flow_name}/{d.name}": d for d in build_deployments(config, timezone="Europe/Berlin")}
    expected = {"pipeline/tokenmill", "nightly-refresh/nightly", "sweep/tokenmill"} | {f"stage/{s}" for s in STAGES}
    assert set(deployments) == expected
    sweep_form = deployments["sweep/tokenmill"]._parameter_openapi_schema.model_dump()["properties"]
    assert {"spec_path", "space", "trials", "objective"} <= set(sweep_form)  # a spec path or an inline space
    (nightly,) = deployments["nightly-refresh/nightly"].schedules
    assert (nightly.schedule.cron, nightly.schedule.timezone) == ("0 2 * * *", "Europe/Berlin")
    assert deployments["pipeline/tokenmill"].parameters["config"]["root"] == config.root
    schema = deployments["pipeline/tokenmill"]._parameter_openapi_schema.model_dump()
    force = schema["properties"]["force"]["anyOf"][0]["items"]
    assert force["enum"] == list(STAGES)  # the UI offers the stage names, and the server rejects others


def test_work_pool_deployments_use_importable_module_entrypoints(config):
    from prefect.deployments.runner import EntrypointType
    from prefect.flows import load_flow_from_entrypoint

    from deployments.serve import build_deployments

    for deployment in build_deployments(config, entrypoint_type=EntrypointType.MODULE_PATH):
        assert deployment.entrypoint.startswith("flows.")
        assert load_flow_from_entrypoint(deployment.entrypoint, use_placeholder_flow=False).name == deployment.flow_name


def test_server_env_tells_the_ui_its_api_url_on_any_port():
    from deployments.server import server_command, server_env

    env = server_env("127.0.0.1", 4321, base={"PATH": "/bin"})
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4321/api"
    assert (env["PREFECT_UI_ENABLED"], env["PREFECT_SERVER_ANALYTICS_ENABLED"], env["DO_NOT_TRACK"]) == (
        "true",
        "false",
        "1",
    )
    assert server_command("127.0.0.1", 4321)[-6:] == ["server", "start", "--host", "127.0.0.1", "--port", "4321"]
