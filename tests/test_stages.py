"""Each stage called as a plain function on the tiny corpus: outputs, drop reasons, conservation."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from storage.shards import read_token_shard
from tasks.config import PipelineConfig
from tasks.data.clean import normalize
from tasks.data.tokenize import split_of
from tasks.data.tokenizer import load_tokenizer
from tasks.evaluation.evaluate import token_byte_lengths
from tasks.stages import STAGES, run_all, run_stage
from tests.support.corpus import prose, tiny_config, write_corpus


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("stages")
    write_corpus(base / "corpus")
    cfg = tiny_config(base / "corpus", base / "root")
    return cfg, run_all(cfg, log=lambda m: None)


def _ledger(manifest) -> list[dict]:
    return pq.read_table(manifest.files_under("ledger/")).to_pylist()


def test_ingest_records_every_input_with_a_reason(built):
    _, m = built
    rows = _ledger(m["ingest"])
    reasons = {r["locator"]: r["reason"] for r in rows if r["fate"] == "dropped"}
    assert reasons["binary.txt"] == "binary"
    assert reasons["latin1.txt"] == "invalid_utf8"
    assert reasons["records.jsonl.gz:11"] == "malformed_json"
    assert reasons["records.jsonl.gz:12"] == "missing_text_field"
    assert not any(r["locator"] == "ignored.bin" for r in rows)  # not a listed extension: not an input
    assert len(rows) == m["ingest"].counts["docs_in"] == 54


@pytest.mark.parametrize("stage", ["ingest", "clean", "dedup"])
def test_conservation_from_the_ledger(built, stage):
    _, m = built
    counts = m[stage].counts
    rows = _ledger(m[stage])
    kept = sum(r["fate"] == "kept" for r in rows)
    assert len(rows) == counts["docs_in"] == kept + sum(counts["dropped"].values())
    assert kept == counts["kept"]
    by_reason: dict[str, int] = {}
    for r in rows:
        if r["fate"] != "kept":
            by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    assert by_reason == counts["dropped"]


def test_each_stage_input_is_previous_stage_kept(built):
    _, m = built
    assert m["clean"].counts["docs_in"] == m["ingest"].counts["kept"]
    assert m["dedup"].counts["docs_in"] == m["clean"].counts["kept"]
    assert m["tokenize"].counts["docs_in"] == m["dedup"].counts["kept"]


def test_clean_normalizes_and_drops_short_and_empty(built):
    _, m = built
    reasons = {r["doc_id"]: r["reason"] for r in _ledger(m["clean"]) if r["fate"] == "dropped"}
    assert sorted(reasons.values()) == ["empty", "too_short"]
    assert normalize("a\r\nb\rc\x00\u200b\ufeff  \n") == "a\nb\nc\u200b"
    assert normalize("e\u0301") == "\u00e9"  # NFC


def test_dedup_points_duplicates_at_the_first_copy(built):
    _, m = built
    ingest_rows = {r["doc_id"]: r["locator"] for r in _ledger(m["ingest"])}
    dups = {
        ingest_rows[r["doc_id"]]: ingest_rows[r["duplicate_of"]]
        for r in _ledger(m["dedup"])
        if r["reason"] == "exact_duplicate"
    }
    assert dups == {"nested/deeper/copy_of_prose_03.txt": "prose_03.txt", "prose_04.txt": "crlf_copy_of_prose_04.md"}


def test_tokenize_round_trips_every_document(built):
    cfg, m = built
    tokenizer = load_tokenizer(Path(m["tokenizer"].path))
    eot = m["tokenize"].counts["eot_id"]
    texts = {r["doc_id"]: r["text"] for r in pq.read_table(m["dedup"].files_under("docs/")).to_pylist()}
    spans = [r for r in _ledger(m["tokenize"])]
    assert len(spans) == len(texts)
    shards = {p.stem: read_token_shard(p) for p in m["tokenize"].files_under("tokens/")}
    for row in spans:
        ids = shards[row["shard"]][row["token_start"] : row["token_end"]]
        assert ids[-1] == eot
        assert tokenizer.decode(ids[:-1].tolist(), skip_special_tokens=False) == texts[row["doc_id"]]
        assert row["split"] == split_of(row["doc_id"], cfg.tokenize)


def test_token_byte_lengths_count_the_text_bytes(built):
    _, m = built
    tokenizer = load_tokenizer(Path(m["tokenizer"].path))
    lengths = token_byte_lengths(tokenizer)
    text = "déjà vu — naïve café\n    return x + 1"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert int(lengths[np.array(ids)].sum()) == len(text.encode())


def test_rerun_gives_identical_content_hashes(built, tmp_path: Path):
    cfg, m = built
    again = run_all(cfg.model_copy(update={"root": str(tmp_path / "other-root")}), log=lambda m: None)
    for stage in STAGES:
        assert again[stage].content_hash == m[stage].content_hash, stage


def test_split_is_stable_when_documents_are_added(built, tmp_path: Path):
    cfg, m = built
    before = {r["doc_id"]: r["split"] for r in _ledger(m["tokenize"])}
    corpus = Path(cfg.sources[0].path)
    for i in range(10):
        (corpus / f"new_{i}.txt").write_text(prose(1000 + i))  # real prose, so it passes the quality filters
    grown = cfg.model_copy(update={"root": str(tmp_path / "grown")})
    try:
        m2 = run_all(grown, log=lambda m: None)
    finally:
        for i in range(10):
            (corpus / f"new_{i}.txt").unlink()
    after = {r["doc_id"]: r["split"] for r in _ledger(m2["tokenize"])}
    assert len(after) == len(before) + 10
    assert all(after[d] == s for d, s in before.items())


def test_model_beats_nothing_but_reports_all_metrics(built):
    _, m = built
    for split in ("val", "test"):
        metrics = m["evaluate"].counts[split]
        assert metrics["tokens"] > 0 and metrics["bytes"] > 0
        assert np.isclose(metrics["perplexity"], np.exp(metrics["loss"]))


def test_ledger_is_queryable_with_duckdb(built):
    _, m = built
    files = [str(p) for s in ("ingest", "clean", "dedup", "tokenize") for p in m[s].files_under("ledger/")]
    fates = dict(
        duckdb.sql(f"SELECT stage, count(*) FROM read_parquet({files!r}, union_by_name=true) GROUP BY 1").fetchall()
    )
    # dedup removes 2 exact copies and 11 of the 12 templated code files (near-duplicates: only numbers differ)
    assert fates == {"ingest": 54, "clean": 50, "dedup": 48, "tokenize": 46}


def test_unknown_stage_and_missing_input_are_clear_errors(config: PipelineConfig):
    with pytest.raises(ValueError, match="unknown stage"):
        run_stage("bogus", config, {})
    with pytest.raises(ValueError, match="needs the artifacts"):
        run_stage("clean", config, {})


def test_missing_source_is_a_clear_error(tmp_path: Path):
    cfg = tiny_config(tmp_path / "nowhere", tmp_path / "root")
    with pytest.raises(FileNotFoundError, match="source 'docs'"):
        run_stage("ingest", cfg, {})


def test_tokenizer_reports_compression_on_held_out_documents(built):
    _, m = built
    counts = m["tokenizer"].counts
    assert counts["heldout_docs"] > 0
    assert counts["bytes_per_token"] == round(counts["heldout_bytes"] / counts["heldout_tokens"], 4)
    assert counts["bytes_per_token"] > 1.0  # BPE merges compress below one token per byte


def test_tokenizer_training_is_deterministic(built, tmp_path: Path):
    cfg, m = built
    from storage.artifacts import StageContext
    from tasks.data.tokenizer import train_tokenizer

    out = tmp_path / "tok"
    out.mkdir()
    train_tokenizer(m["dedup"].files_under("docs/"), cfg.tokenizer, StageContext(out_dir=out, work_dir=tmp_path))
    assert (out / "tokenizer.json").read_bytes() == (Path(m["tokenizer"].path) / "tokenizer.json").read_bytes()
