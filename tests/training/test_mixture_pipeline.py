"""A two-source run with weights: realized shares near the targets, recorded on the trained_on edge and in lineage."""

from __future__ import annotations

import json
from pathlib import Path

from storage.artifacts import ArtifactStore
from storage.lineage import LineageStore
from storage.lineage_queries import LineageQueries
from tasks.stages import SPECS, run_all
from tests.support.corpus import prose, tiny_config, write_prose_jsonl


def _config(tmp_path: Path, weights: tuple[float, float] | None):
    big = write_prose_jsonl(tmp_path / "big", files=3, docs_per_file=20)
    small = tmp_path / "small.jsonl"  # other texts than big's (write_prose_jsonl would repeat its first file)
    small.write_text("".join(json.dumps({"text": prose(1000 + i)}) + "\n" for i in range(8)))
    sources = [{"name": "big", "path": str(big)}, {"name": "small", "path": str(small)}]
    if weights:
        sources[0] |= {"weight": weights[0]}
        sources[1] |= {"weight": weights[1], "max_repeats": 50}
    return tiny_config(tmp_path, tmp_path / "data", sources=sources, train={"max_steps": 12, "batch_size": 8})


def test_weights_leave_ingest_and_unweighted_train_fingerprints_alone(tmp_path: Path):
    plain, weighted = _config(tmp_path, None), _config(tmp_path, (1.0, 1.0))
    assert SPECS["ingest"].params(plain) == SPECS["ingest"].params(weighted)
    assert "mixture" not in SPECS["train"].params(plain) and "mixture" in SPECS["train"].params(weighted)


def test_two_source_run_trains_on_the_target_shares_and_records_them(tmp_path: Path):
    cfg = _config(tmp_path, (1.0, 1.0))  # half and half, although "small" holds an eighth of the tokens
    manifests = run_all(cfg, log=lambda m: None)
    counts = manifests["train"].counts
    windows = counts["tokens_trained"] // 32
    assert sum(counts["tokens_per_source"].values()) == counts["tokens_trained"]
    assert abs(counts["share_per_source"]["small"] - 0.5) <= 1 / windows
    natural = manifests["tokenize"].counts["tokens_per_source"]
    assert natural["small"]["train"] < natural["big"]["train"] / 3  # the weights, not the corpus, set the share
    store = LineageStore(ArtifactStore(cfg.root).lineage_path)
    [edge] = store.query("SELECT tokens_per_source FROM artifact_edges WHERE relation = 'trained_on'")
    assert json.loads(edge["tokens_per_source"]) == counts["tokens_per_source"]
    [model] = [m for m in LineageQueries(store).source("small")["models"] if m["stage"] == "train"]
    assert model["tokens_per_source"]["small"] == counts["tokens_per_source"]["small"]
