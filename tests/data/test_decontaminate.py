"""Decontamination: training documents that overlap val/test documents or a named benchmark are dropped or flagged."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from storage.hashing import stable_id
from tasks.data.decontaminate import NgramIndex, check_batch
from tasks.data.tokenize import split_of
from tasks.errors import UserError
from tasks.preflight import preflight
from tasks.stages import SPECS, STAGES, run_stage
from tests.support.corpus import prose, tiny_config

ITEM = (
    "Question: which river runs through the fictional city of Onhava in the kingdom of Zembla? "
    "Answer: the Embla, which freezes every winter from November until the end of March."
)


def test_index_finds_an_item_inside_a_document_whatever_its_case_and_punctuation():
    index = NgramIndex.build("bench", [([ITEM, "too short to index"], ["q1", "q2"])], n=8)
    assert index.skipped == 1
    doc = prose(1) + "\n" + ITEM.upper().replace(",", " ;") + "\n" + prose(2)
    found = check_batch(["d1", "d2"], ["s", "s"], [doc, prose(3)], [index], n=8, min_overlap=0.2)
    assert [m.set for m in found[0]] == ["bench"] and found[0][0].items == [("q1", 1.0)]
    assert found[1] == []
    half = " ".join(ITEM.split()[:12])  # a part of the item: overlap below 1
    partial = check_batch(["d3"], ["s"], [prose(4) + " " + half], [index], n=8, min_overlap=0.2)[0][0]
    assert 0.2 <= partial.overlap < 0.5


def test_partial_indexes_combined_in_order_equal_one_index_of_everything():
    """Tokenize's parts index their own shard's val/test documents; combined, that is the one-pass index."""
    batches = [([prose(i), ITEM if i == 3 else prose(50 + i), "short"], [f"a{i}", f"b{i}", f"c{i}"]) for i in range(5)]
    whole = NgramIndex.build("val", batches, n=8)
    parts = [NgramIndex.build("val", batches[:2], n=8), NgramIndex.build("val", [], n=8)]
    combined = NgramIndex.combine("val", parts + [NgramIndex.build("val", batches[2:], n=8)])
    assert combined.item_ids == whole.item_ids and combined.skipped == whole.skipped == 5
    for field in ("grams", "items", "item_grams"):
        assert getattr(combined, field).tobytes() == getattr(whole, field).tobytes(), field
        assert getattr(combined, field).dtype == getattr(whole, field).dtype, field


def _doc_id(source: str, key: str) -> str:
    return f"{source}:{stable_id(source, 'id', key)}"


def _corpus(tmp_path: Path, bench_items: list[dict]) -> tuple[Path, Path, dict[str, str]]:
    """30 prose documents, one holding the benchmark item, one holding a whole test document."""
    cfg = tiny_config(tmp_path, tmp_path / "data").tokenize
    keys = [f"r{i}" for i in range(200)]
    test_key = next(k for k in keys if split_of(_doc_id("web", k), cfg) == "test")
    train_keys = [k for k in keys if split_of(_doc_id("web", k), cfg) == "train"]
    records = {k: prose(i) for i, k in enumerate(train_keys[:28])}
    records[test_key] = prose(500)
    records[train_keys[28]] = prose(600) + "\n" + ITEM + "\n" + prose(601)  # the planted benchmark item
    records[train_keys[29]] = prose(700) + "\n" + records[test_key] + prose(701) + prose(702)  # contains test doc
    corpus = tmp_path / "web.jsonl"
    corpus.write_text("".join(json.dumps({"id": k, "text": t}) + "\n" for k, t in records.items()))
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(item) + "\n" for item in bench_items))
    planted = {"bench": _doc_id("web", train_keys[28]), "test": _doc_id("web", train_keys[29])}
    return corpus, bench, planted


def _run_to_tokenize(cfg):
    manifests = {}
    for name in STAGES[: STAGES.index("tokenize") + 1]:
        manifests[name], _ = run_stage(name, cfg, manifests, log=lambda m: None)
    return manifests


def _config(tmp_path: Path, corpus: Path, bench: Path, action: str):
    return tiny_config(
        tmp_path,
        tmp_path / f"data-{action}",
        sources=[{"name": "web", "path": str(corpus), "id_field": "id"}],
        decontaminate={
            "ngram": 8,
            "action": action,
            "sets": [{"name": "bench", "path": str(bench), "id_field": "qid"}],
        },
    )


@pytest.mark.parametrize("action", ["drop", "flag"])
def test_planted_documents_are_found_against_a_configured_set_and_against_test(tmp_path: Path, action: str):
    corpus, bench, planted = _corpus(
        tmp_path, [{"qid": "zembla-7", "text": ITEM}, {"qid": "other", "text": prose(999)}]
    )
    tok = _run_to_tokenize(_config(tmp_path, corpus, bench, action))["tokenize"]
    ledger = {r["doc_id"]: r for r in pq.read_table(tok.file("ledger")).to_pylist()}
    fate = "dropped" if action == "drop" else "kept"
    assert ledger[planted["bench"]]["reason"] == "contaminated:bench" and ledger[planted["bench"]]["score"] == 1.0
    assert ledger[planted["test"]]["reason"] == "contaminated:test" and ledger[planted["test"]]["score"] == 1.0
    assert {ledger[d]["fate"] for d in planted.values()} == {fate}
    assert (ledger[planted["bench"]]["shard"] is None) == (action == "drop")
    others = [r for d, r in ledger.items() if d not in planted.values()]
    assert [(r["reason"], r["fate"]) for r in others] == [(None, "kept")] * len(others)
    matches = pq.read_table(tok.file("contamination/matches.parquet")).to_pylist()
    by_set = {m["set"]: m for m in matches}
    assert by_set["bench"]["item_id"] == "zembla-7" and by_set["bench"]["doc_id"] == planted["bench"]
    assert by_set["test"]["doc_id"] == planted["test"]
    counts = tok.counts
    assert counts["contamination"]["sets"]["bench"] == {
        "items": 2, "items_without_ngrams": 0, "items_matched": 1, "docs_matched": 1,
    }  # fmt: skip
    assert counts["docs_in"] == counts["kept"] + sum(counts["dropped"].values())  # conserved
    if action == "drop":
        assert counts["dropped"] == {"contaminated:bench": 1, "contaminated:test": 1}


def test_a_missing_benchmark_file_is_a_one_line_error_before_any_work(tmp_path: Path):
    corpus, bench, _ = _corpus(tmp_path, [{"qid": "a", "text": ITEM}])
    cfg = _config(tmp_path, corpus, tmp_path / "nope.jsonl", "drop")
    with pytest.raises(UserError, match=r"decontaminate.sets\[bench\].*nope.jsonl"):
        preflight(cfg)  # before any stage
    with pytest.raises(UserError, match=r"decontaminate.sets\[bench\].*nope.jsonl"):
        SPECS["tokenize"].params(cfg)  # the parameters hash the set's content: computed before the stage runs
