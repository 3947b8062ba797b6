"""Evaluation as its own rerunnable Prefect flow: an existing checkpoint on existing shards, without retraining."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from storage.artifacts import ArtifactStore
from storage.lineage import LineageStore
from tasks.errors import UserError
from tasks.stages import run_all
from tests.support.corpus import tiny_config

pytestmark = pytest.mark.prefect


def test_cli_evaluates_a_checkpoint_as_a_flow_and_compares_with_the_previous_run(
    prefect_harness, corpus: Path, tmp_path: Path
):
    from flows.cli import app

    cfg = tiny_config(corpus, tmp_path / "root")
    built = run_all(cfg, log=lambda m: None)
    config = tmp_path / "eval.yaml"
    config.write_text("evaluate:\n  batch_size: 8\n  probe_items: 5\n  samples: 1\n  sample_tokens: 4\n")
    args = ["evaluate", "--model", built["train"].path, "--tokens", built["tokenize"].path, "--config", str(config)]
    runner = CliRunner()
    first = runner.invoke(app, [*args, "--export"])
    assert first.exit_code == 0, first.output
    assert "test: loss" in first.output and "report:" in first.output
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output

    store = ArtifactStore(cfg.root)
    lineage = LineageStore(store.lineage_path)
    first_run, second_run = (r["run_id"] for r in reversed(lineage.runs()) if r["pipeline"] == "evaluate")
    assert [r["stage"] for r in lineage.stage_runs(first_run)] == ["evaluate", "export"]
    assert {r["status"] for r in lineage.stage_runs(first_run)} == {"completed", "cached"}  # export was built already
    assert [r["status"] for r in lineage.stage_runs(second_run)] == ["cached"]
    assert [p.name for p in (store.root / "train").iterdir() if not p.name.startswith(".")] == [
        built["train"].fingerprint
    ]  # no retraining: still the one model
    evaluated = lineage.stage_runs(first_run)[0]["fingerprint"]
    assert evaluated != built["evaluate"].fingerprint  # other evaluate settings: a new artifact, same model
    assert lineage.previous_evaluated_run("evaluate", second_run) == first_run
    report = store.report_dir(second_run) / "report.md"
    assert f"previous run of `evaluate`: `{first_run}`" in report.read_text()
    assert lineage.metrics(second_run)


def test_evaluate_rejects_the_wrong_kind_of_artifact(corpus: Path, tmp_path: Path):
    from flows.evaluate import resolve_inputs

    built = run_all(tiny_config(corpus, tmp_path / "root"), log=lambda m: None)
    with pytest.raises(UserError, match="pass a train artifact folder"):
        resolve_inputs(built["tokenize"].path, built["tokenize"].path, None)
    with pytest.raises(UserError, match="--model: .*not a tokenmill artifact"):
        resolve_inputs(tmp_path, built["tokenize"].path, None)
