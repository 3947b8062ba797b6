"""The run report states dropped bytes with samples per reason, contamination per set, the mixture and loss spikes."""

from __future__ import annotations

import json
from pathlib import Path

from storage.artifacts import ArtifactStore
from storage.lineage import LineageStore
from tasks.reporting.report import publish_run_report
from tasks.stages import run_all
from tests.data.test_decontaminate import ITEM
from tests.support.corpus import prose, tiny_config, write_prose_jsonl


def test_report_shows_curation(tmp_path: Path):
    big = write_prose_jsonl(tmp_path / "big", files=2, docs_per_file=20)
    small = tmp_path / "small.jsonl"
    texts = [prose(1000 + i) for i in range(10)] + [prose(2000) + "\n" + ITEM + "\n" + prose(2001), "too short"]
    small.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"id": "zembla-7", "text": ITEM}) + "\n")
    cfg = tiny_config(
        tmp_path,
        tmp_path / "data",
        sources=[
            {"name": "big", "path": str(big), "weight": 3.0},
            {"name": "small", "path": str(small), "weight": 1.0},
        ],
        decontaminate={"ngram": 8, "action": "flag", "sets": [{"name": "bench", "path": str(bench), "id_field": "id"}]},
        train={"max_steps": 8, "warmup_steps": 2},
    )
    manifests = run_all(cfg, log=lambda m: None)
    store = ArtifactStore(cfg.root)
    lineage = LineageStore(store.lineage_path)
    lineage.start_run("r1", cfg.name, {}, cfg.seed, None)
    run, paths = publish_run_report(store, lineage, "r1", cfg.name, manifests)
    text = paths["markdown"].read_text()
    assert "too_short = 1" in text and "MB" in text  # documents and bytes per reason
    assert "Dropped by clean, a few per reason" in text and "| too_short |" in text
    assert "Decontamination (8-grams" in text and "| bench | 1 |" in text
    assert "Source mixture" in text and "| big |" in text and "75.0%" in text
    assert "Highest-loss steps" in text and len(run["loss_spikes"]) == 3
    rows = {(r["stage"], r["source"], r["metric"]): r["value"] for r in lineage.metrics("r1")}
    assert rows[("train", "small", "tokens")] == manifests["train"].counts["tokens_per_source"]["small"]
    assert ("clean", None, "dropped_bytes.too_short") in rows
