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


# --- the run form, UI placeholders, summaries, progress ------------------------------------------------------


def _short_form(deployment) -> dict:
    return deployment._parameter_openapi_schema.model_dump()["properties"]


def test_pipeline_form_is_short_titled_described_and_bounded(config, tmp_path: Path):
    from deployments.serve import build_deployments, default_parameters

    yaml_file = tmp_path / "tiny.yaml"
    yaml_file.write_text("name: tiny\n")
    params = default_parameters(config, yaml_file)
    # the form's defaults: a path (not 300 fields), and the seed and budget shown filled in
    assert params == {"config": str(yaml_file.resolve()), "seed": config.seed, "train_steps": config.train.max_steps}
    deployments = {f"{d.flow_name}/{d.name}": d for d in build_deployments(config, parameters=params)}
    form = _short_form(deployments["pipeline/tokenmill"])
    assert list(form) == ["config", "root", "seed", "train_steps", "sources", "force"]
    assert [form[k]["title"] for k in form] == [
        "Configuration",
        "Data root",
        "Seed",
        "Training steps",
        "Sources",
        "Recompute stages",
    ]
    assert all(len(form[k]["description"]) > 20 for k in form)
    steps = form["train_steps"]["anyOf"][0]
    assert (steps["minimum"], steps["maximum"]) == (1, 1_000_000)
    assert {"type": "string"} in form["config"]["anyOf"]  # a name or path; the full configuration stays an option
    assert any("PipelineConfig" in str(option) for option in form["config"]["anyOf"])
    for name in ("nightly-refresh/nightly", "stage/train"):
        schema = _short_form(deployments[name])
        assert all(schema[k].get("description") for k in schema), schema  # run_id, root, force, train_steps
    assert deployments["pipeline/tokenmill"].concurrency_limit >= 1
    assert deployments["nightly-refresh/nightly"].concurrency_limit == 1


def test_run_config_applies_the_short_form_to_a_name_path_or_full_config(tmp_path: Path, monkeypatch):
    from flows.parameters import resolve_run_config
    from tasks.config import PipelineConfig
    from tasks.errors import UserError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text("name: tiny\ntrain:\n  max_steps: 5\n")
    quick = resolve_run_config("tiny", seed=7, train_steps=12, sources=["/data/books", "code=/src/repo"])
    assert (quick.name, quick.seed, quick.train.max_steps) == ("tiny", 7, 12)
    assert resolve_run_config("configs/tiny.yaml").train.max_steps == 5
    assert [(s.name, s.path) for s in quick.sources] == [("books", "/data/books"), ("code", "/src/repo")]
    full = resolve_run_config(PipelineConfig(seed=3).model_dump(mode="json"), root=str(tmp_path))
    assert (full.seed, full.root) == (3, str(tmp_path))
    with pytest.raises(UserError, match="no configuration named 'nope'.*tiny"):
        resolve_run_config("nope")
    with pytest.raises(UserError, match="missing.yaml does not exist"):
        resolve_run_config(str(tmp_path / "missing.yaml"))


def test_ui_placeholders_from_a_schedule_mean_unset():
    """The scheduler does not hydrate a UI schedule's parameters; the flow does, as the server does for runs."""
    from flows.parameters import hydrate_ui_value

    assert hydrate_ui_value({"__prefect_kind": "json"}) is None
    assert hydrate_ui_value({"__prefect_kind": "json", "value": '["train"]'}) == ["train"]
    assert hydrate_ui_value({"seed": 1, "train": {"__prefect_kind": "json"}}) == {"seed": 1}
    assert hydrate_ui_value(["a", {"__prefect_kind": "json"}]) == ["a"]
    assert hydrate_ui_value(5) == 5


def test_stage_summaries_flatten_nested_counts_and_skip_empty_drop_tables():
    from flows.pipeline import counts_line, counts_table

    evaluate = {"val": {"tokens": 10, "loss": 2.5, "perplexity": 12.18, "bits_per_byte": 1.1}, "probes": {"x": 0.5}}
    rows = {r["count"]: r["value"] for r in counts_table(evaluate)}
    assert rows["val.loss"] == 2.5 and rows["probes.x"] == 0.5  # the evaluate-counts table is no longer empty
    assert counts_line("evaluate", evaluate) == "evaluate: val loss 2.5000, perplexity 12.18, bits/byte 1.1000"
    clean = {"docs_in": 100, "kept": 90, "dropped": {"too_short": 7, "pii": 3}}
    assert counts_line("clean", clean) == "clean: 100 documents in, 90 kept, 10 dropped (too_short 7, pii 3)"
    assert {r["count"] for r in counts_table(clean)} == {"docs_in", "kept", "dropped.too_short", "dropped.pii"}


def test_plain_progress_lines_when_output_is_not_a_terminal():
    import io

    from rich.console import Console

    from flows.console_progress import stage_progress
    from flows.progress import StageEvent, publish

    out = io.StringIO()
    with stage_progress(Console(file=out, width=80)):
        publish(StageEvent("train", "start"))
        publish(StageEvent("train", "progress", 0.5, "step 3/6 loss 4.2"))
        publish(StageEvent("train", "done", 1.0, "built in 2.0 s"))
    publish(StageEvent("train", "start"))  # after the block: nobody listens
    assert out.getvalue().splitlines() == ["train: started", "train: built in 2.0 s"]  # progress throttled


def test_terminal_progress_bars_show_each_stage():
    import io

    from rich.console import Console

    from flows.console_progress import stage_progress
    from flows.progress import StageEvent, publish

    out = io.StringIO()
    with stage_progress(Console(file=out, width=120, force_terminal=True)):
        for stage in ("ingest", "train"):
            publish(StageEvent(stage, "start"))
            publish(StageEvent(stage, "progress", 0.5, "step 3/6 loss 4.2"))
            publish(StageEvent(stage, "done", 1.0, "cached"))
    text = out.getvalue()
    assert "ingest" in text and "train" in text and "100%" in text and "cached" in text


def test_a_leftover_task_run_is_traced_to_its_stage_by_its_name_or_prefects_first_name():
    from flows.pipeline import stage_of_task_run

    assert stage_of_task_run("tokenize") == "tokenize"
    assert stage_of_task_run("tokenize-398") == "tokenize"  # killed before the templated name was applied
    assert stage_of_task_run("tokenizer-12") == "tokenizer"
    assert stage_of_task_run("trial-3") is None and stage_of_task_run("sweep-tokenize") is None
