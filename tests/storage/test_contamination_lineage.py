"""`lineage contamination`: which models trained on documents overlapping an evaluation set, through duplicates."""

from __future__ import annotations

import json
from pathlib import Path

from storage.artifacts import ArtifactStore
from storage.lineage import LineageStore
from storage.lineage_queries import LineageQueries
from tasks.data.tokenize import split_of
from tasks.stages import run_all
from tests.data.test_decontaminate import ITEM, _doc_id
from tests.support.corpus import prose, tiny_config


def test_contamination_names_the_model_the_item_and_the_near_duplicate_copy(tmp_path: Path):
    planted = prose(600) + "\n" + ITEM + "\n" + prose(601)
    near_copy = planted.replace("Question:", "Question -", 1)  # one word differs: a near-duplicate
    records = [{"id": f"r{i}", "text": prose(i)} for i in range(30)]
    train_cfg = tiny_config(tmp_path, tmp_path / "data").tokenize
    key = next(f"p{i}" for i in range(100) if split_of(_doc_id("web", f"p{i}"), train_cfg) == "train")
    records += [{"id": key, "text": planted}, {"id": "copy", "text": near_copy}]  # the first copy is kept
    corpus = tmp_path / "web.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    bench = tmp_path / "bench.jsonl"
    bench.write_text(
        json.dumps({"qid": "zembla-7", "text": ITEM}) + "\n" + json.dumps({"qid": "q2", "text": prose(999)})
    )
    cfg = tiny_config(
        tmp_path,
        tmp_path / "data",
        sources=[{"name": "web", "path": str(corpus), "id_field": "id"}],
        decontaminate={"ngram": 8, "action": "flag", "own_splits": False,
                       "sets": [{"name": "bench", "path": str(bench), "id_field": "qid"}]},
    )  # fmt: skip
    manifests = run_all(cfg, log=lambda m: None)
    queries = LineageQueries(LineageStore(ArtifactStore(cfg.root).lineage_path))
    answer = queries.contamination()
    [model] = answer["models"]
    assert model["model"] == manifests["train"].fingerprint and model["checked"]
    bench_answer = model["sets"]["bench"]
    assert bench_answer["items"] == 2 and bench_answer["removed"] == []
    [item] = bench_answer["trained_on"]
    assert item["item_id"] == "zembla-7"
    [doc] = item["docs"]
    kept, dropped = sorted([doc["doc_id"], *doc["copies"]], key=lambda d: d != doc["doc_id"])
    assert len(doc["copies"]) == 1 and doc["overlap"] == 1.0  # the kept document, and the copy dedup removed
    assert queries.why(kept)["flags"] == [{"stage": "tokenize", "reason": "contaminated:bench", "score": 1.0}]
    assert queries.why(dropped)["duplicate_of"] == kept
    assert queries.contamination(set_name="val")["models"][0]["sets"] == {}
    assert queries.contamination(model=model["model"][:10])["models"][0]["model"] == model["model"]
