"""The Prefect flow end to end on the tiny corpus: stages complete, reruns hit the cache, changes rerun downstream."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.artifacts import ArtifactStore, Manifest
from storage.lineage import LineageStore
from tasks.stages import STAGES
from tests.support.corpus import tiny_config

pytestmark = pytest.mark.prefect


def _statuses(root: str, run_id: str) -> dict[str, str]:
    rows = LineageStore(ArtifactStore(root).lineage_path).stage_runs(run_id)
    return {r["stage"]: r["status"] for r in rows}


def test_pipeline_runs_caches_and_reruns_only_downstream(prefect_harness, corpus: Path, tmp_path: Path, monkeypatch):
    from flows.pipeline import pipeline

    monkeypatch.setenv("TOKENMILL_FAULT_DIR", str(tmp_path / "faults"))
    cfg = tiny_config(corpus, tmp_path / "root")
    first = pipeline(config=cfg)
    assert _statuses(cfg.root, first["run_id"]) == dict.fromkeys(STAGES, "completed")
    store = ArtifactStore(cfg.root)
    for stage, path in first["artifacts"].items():
        manifest = Manifest.model_validate_json(Path(path, "manifest.json").read_text())
        store.verify(manifest)  # every file matches its manifest hash
        assert manifest.stage == stage

    second = pipeline(config=cfg)
    assert second["run_id"] != first["run_id"]
    assert _statuses(cfg.root, second["run_id"]) == dict.fromkeys(STAGES, "cached")
    assert second["artifacts"] == first["artifacts"]

    changed = cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"vocab_size": 320})})
    third = pipeline(config=changed)
    statuses = _statuses(cfg.root, third["run_id"])
    assert {s: statuses[s] for s in ("ingest", "clean", "dedup")} == dict.fromkeys(
        ("ingest", "clean", "dedup"), "cached"
    )
    assert {s: statuses[s] for s in ("tokenizer", "tokenize", "train", "evaluate")} == dict.fromkeys(
        ("tokenizer", "tokenize", "train", "evaluate"), "completed"
    )
    assert third["artifacts"]["dedup"] == first["artifacts"]["dedup"]
    assert third["artifacts"]["tokenizer"] != first["artifacts"]["tokenizer"]

    lineage = LineageStore(store.lineage_path)
    assert [r["status"] for r in lineage.runs()] == ["completed"] * 3


def test_a_failing_stage_is_retried_by_prefect(prefect_harness, corpus: Path, tmp_path: Path, monkeypatch):
    from flows.pipeline import pipeline

    monkeypatch.setenv("TOKENMILL_FAULT", "dedup:end")
    monkeypatch.setenv("TOKENMILL_FAULT_DIR", str(tmp_path / "faults"))
    cfg = tiny_config(corpus, tmp_path / "root")
    result = pipeline(config=cfg)
    assert (tmp_path / "faults" / "tokenmill-fault-dedup-end").exists()  # the fault fired once
    assert _statuses(cfg.root, result["run_id"]) == dict.fromkeys(STAGES, "completed")


def test_a_corrupted_cached_artifact_is_detected_and_rebuilt(prefect_harness, corpus: Path, tmp_path: Path):
    from flows.pipeline import pipeline

    cfg = tiny_config(corpus, tmp_path / "root")
    first = pipeline(config=cfg)
    shard = sorted(Path(first["artifacts"]["tokenize"], "tokens").glob("train-*.arrow"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # a bit flip the manifest's SHA-256 no longer matches
    shard.write_bytes(bytes(data))
    second = pipeline(config=cfg)
    statuses = _statuses(cfg.root, second["run_id"])
    assert statuses["tokenize"] == "completed"  # rebuilt, although Prefect had it cached
    assert statuses["ingest"] == statuses["train"] == "cached"  # same content hash, so downstream stays cached
    assert second["artifacts"] == first["artifacts"]
    ArtifactStore(cfg.root).verify(
        Manifest.model_validate_json(Path(second["artifacts"]["tokenize"], "manifest.json").read_text())
    )
