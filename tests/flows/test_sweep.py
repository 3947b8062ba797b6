"""The sweep flow on the tiny corpus: shared stages built once, a failing trial retried alone, test read once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from storage.artifacts import ArtifactStore
from storage.lineage import LineageStore
from storage.stage_graph import DATA_STAGES
from tasks.errors import UserError
from tasks.sweep.evalset import EVAL_SET_STAGE, SCORE_STAGE
from tests.support.corpus import tiny_config

pytestmark = pytest.mark.prefect


def _spec(tmp_path: Path, corpus: Path, name: str, **fields) -> Path:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tiny_config(corpus, tmp_path / "root").model_dump(mode="json")))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", "concurrency": 2} | fields, sort_keys=False))
    return path


def _widen_training_slots(width: int) -> None:
    """What an operator does in the UI: an earlier flow test may have created ``cpu-train`` 1 wide."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    from flows.pipeline import CPU_TRAIN_LIMIT, ensure_limit

    ensure_limit(CPU_TRAIN_LIMIT, width)
    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(CPU_TRAIN_LIMIT, GlobalConcurrencyLimitUpdate(limit=width))


def _latest_artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC, limit=1
        )
    return found[0].data


def _built(root: Path) -> dict[str, int]:
    store = ArtifactStore(root)
    stages = (*DATA_STAGES, "train", "evaluate", "export", EVAL_SET_STAGE, SCORE_STAGE)
    return {stage: len(store.published(stage)) for stage in stages}


def test_a_sweep_builds_shared_stages_once_retries_a_failed_trial_alone_and_reads_test_once(
    prefect_harness, corpus: Path, tmp_path: Path, monkeypatch
):
    from flows.sweep import sweep

    monkeypatch.setenv("TOKENMILL_FAULT", "train:step3")  # the first trial to reach step 3 fails once
    monkeypatch.setenv("TOKENMILL_FAULT_DIR", str(tmp_path / "faults"))
    path = _spec(tmp_path, corpus, "lr", space={"train.learning_rate": [1e-3, 3e-3, 1e-2]})
    _widen_training_slots(2)
    result = sweep(spec_path=str(path))
    root = tmp_path / "root"

    built = _built(root)
    assert {s: built[s] for s in DATA_STAGES} == dict.fromkeys(DATA_STAGES, 1)  # shared by all three trials
    assert built["train"] == 3 and built[SCORE_STAGE] == 3 + 1  # every trial on val, the winner on test
    assert built["evaluate"] == built["export"] == 1  # only the winner touched test
    assert built[EVAL_SET_STAGE] == 2  # the fixed val documents, and the test documents for the winner

    lineage = LineageStore(ArtifactStore(root).lineage_path)
    trials = lineage.trials(result["sweep_id"])
    assert [t["status"] for t in trials] == ["completed"] * 3
    assert sorted(t["attempts"] for t in trials) == [1, 1, 2]  # the failed trial alone was retried
    retried = next(t for t in trials if t["attempts"] == 2)
    failed_runs = lineage.query("SELECT DISTINCT run_id FROM stage_runs WHERE status = 'failed'")
    assert [r["run_id"] for r in failed_runs] == [retried["run_id"]]
    assert len({t["fingerprints"]["tokenize"] for t in trials}) == 1
    spans = lineage.query(  # from holding a training slot (limit cpu-train, 2 wide) to the published model
        "SELECT started_at, ended_at FROM stage_runs WHERE stage = 'train' AND status = 'completed' AND run_id LIKE ?",
        [f"{result['sweep_id']}-t%"],
    )
    at_once = [sum(s["started_at"] <= t["started_at"] < s["ended_at"] for s in spans) for t in spans]
    assert max(at_once) == 2, spans  # trials trained concurrently, never more than the limit

    winner = min((t for t in trials), key=lambda t: t["objective"])
    assert result["winner"]["trial"] == winner["trial"] and [t["selected"] for t in trials].count(True) == 1
    reads = lineage.test_reads(result["sweep_id"])
    assert len(reads) == 1 and reads[0]["trial"] == winner["trial"]
    assert reads[0]["train_fingerprint"] == winner["fingerprints"]["train"]
    evaluated = ArtifactStore(root).published("evaluate")[0]
    assert [i.fingerprint for i in evaluated.inputs if i.stage == "train"] == [winner["fingerprints"]["train"]]
    assert Path(result["report"]).read_text().count("<svg") >= 2
    assert _latest_artifact("sweep-report").count("](data:image/png;base64,") == 2  # both plots in the UI

    monkeypatch.delenv("TOKENMILL_FAULT")
    again = sweep(spec_path=str(path))  # a finished sweep reruns from cache and does not read test again
    assert _built(root) == built
    assert again["test"]["reused"] and len(lineage.test_reads(result["sweep_id"])) == 1
    replayed = lineage.trials(result["sweep_id"])
    assert [(t["objective"], t["attempts"]) for t in replayed] == [(t["objective"], t["attempts"]) for t in trials]

    wider = _spec(tmp_path, corpus, "lr", space={"train.learning_rate": [1e-3, 3e-3, 1e-2, 3e-2]})
    with pytest.raises(UserError, match="already read its test split"):
        sweep(spec_path=str(wider))  # tuning again under the same name and peeking at test again is refused
    assert _built(root) == built

    from flows.cli import app

    runner = CliRunner()
    answer = runner.invoke(app, ["lineage", "sweep", "lr", "--root", str(root), "--json"])
    assert answer.exit_code == 0, answer.output
    board = json.loads(answer.output)
    assert board["sweep_id"] == result["sweep_id"] and board["leaderboard"][0]["trial"] == winner["trial"]
    assert [r["trial"] for r in board["test_reads"]] == [winner["trial"]]
    listed = runner.invoke(app, ["lineage", "sweeps", "--root", str(root), "--json"])
    assert [r["sweep_id"] for r in json.loads(listed.output)] == [result["sweep_id"]]  # the refused one never started
    exported = runner.invoke(app, ["export", "--sweep", "lr", "--root", str(root), "--out", str(tmp_path / "hf")])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "hf" / "config.json").is_file()


def test_a_data_parameter_sweep_scores_every_trial_on_the_same_documents(prefect_harness, corpus: Path, tmp_path: Path):
    from flows.sweep import sweep

    space = {"tokenizer.vocab_size": [280, 320], "tokenize.val_fraction": [0.15, 0.3]}
    result = sweep(spec_path=str(_spec(tmp_path, corpus, "data", space=space, trials=3)), test=False)
    lineage = LineageStore(ArtifactStore(tmp_path / "root").lineage_path)
    trials = lineage.trials(result["sweep_id"])
    assert len(trials) == 3 and all(t["status"] == "completed" for t in trials)
    assert len({t["fingerprints"]["tokenizer"] for t in trials}) == 2  # different tokenizers ...
    assert len({(t["eval_docs"], t["eval_bytes"]) for t in trials}) == 1  # ... scored on the same documents
    store = ArtifactStore(tmp_path / "root")
    scores = store.published(SCORE_STAGE)
    assert len({next(i.fingerprint for i in s.inputs if i.stage == EVAL_SET_STAGE) for s in scores}) == 1
    assert all(s.counts["bytes"] == s.counts["text_bytes"] for s in scores)  # every byte predicted once
    leaked = [t["eval_docs_in_train"] for t in trials]
    assert 0 in leaked and max(leaked) == 0  # split by doc-id hash: a larger val fraction never moves val to train
    assert store.published("evaluate") == [] and lineage.test_reads(result["sweep_id"]) == []


def test_an_inline_space_needs_a_base_config(tmp_path: Path, corpus: Path):
    from flows.sweep import resolve

    with pytest.raises(UserError, match="give spec_path, or an inline space together with base"):
        resolve(None, {"train.learning_rate": [1e-3]}, None, None, None, None)
    base = _spec(tmp_path, corpus, "unused", space={"train.learning_rate": [1e-3]}).parent / "base.yaml"
    spec, cfg = resolve(None, {"model.n_layer": [1, 2]}, str(base), None, "val_loss", None)
    assert (spec.n_trials, spec.objective, cfg.name) == (2, "val_loss", "tiny")
