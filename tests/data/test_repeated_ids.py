"""Repeated ``id_field`` values: two different documents are never merged under one id."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from tasks.stages import run_stage
from tests.support.corpus import prose, tiny_config


def test_records_repeating_an_id_get_ids_of_their_own(tmp_path: Path):
    folder = tmp_path / "records"
    folder.mkdir()
    rows = [{"id": "a", "text": prose(1)}, {"id": "b", "text": prose(2)}, {"id": "a", "text": prose(3)}]
    (folder / "one.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "two.jsonl").write_text(json.dumps({"id": "b", "text": prose(4)}) + "\n")  # repeats across files
    source = {"name": "rec", "path": str(folder), "id_field": "id"}
    cfg = tiny_config(tmp_path, tmp_path / "root", sources=[source])
    manifest, _ = run_stage("ingest", cfg, {}, log=lambda m: None)
    docs = pq.read_table(manifest.files_under("docs/")).to_pylist()
    ledger = pq.read_table(manifest.files_under("ledger/", ".parquet")).to_pylist()
    assert len(docs) == 4 and len({d["doc_id"] for d in docs}) == 4
    assert len({r["doc_id"] for r in ledger}) == 4 == manifest.counts["kept"]
    assert manifest.counts["repeated_ids"] == {"rec": 2}
    by_text = {d["text"]: d["doc_id"] for d in docs}
    again, _ = run_stage("ingest", cfg.model_copy(update={"root": str(tmp_path / "other")}), {}, log=lambda m: None)
    assert {d["text"]: d["doc_id"] for d in pq.read_table(again.files_under("docs/")).to_pylist()} == by_text


def test_unique_ids_are_left_alone(tmp_path: Path):
    folder = tmp_path / "records"
    folder.mkdir()
    (folder / "one.jsonl").write_text("".join(json.dumps({"id": i, "text": prose(i)}) + "\n" for i in range(3)))
    cfg = tiny_config(tmp_path, tmp_path / "root", sources=[{"name": "rec", "path": str(folder), "id_field": "id"}])
    manifest, _ = run_stage("ingest", cfg, {}, log=lambda m: None)
    assert "repeated_ids" not in manifest.counts
