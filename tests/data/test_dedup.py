"""Dedup on small synthetic corpora: planted near-duplicates, distinct documents, clusters, incremental runs."""

from __future__ import annotations

import random
import string
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from storage.artifacts import StageContext
from storage.shards import ParquetShardWriter
from tasks.config import DedupConfig, PipelineConfig
from tasks.data import dedup as dd
from tasks.data.clean import CLEAN_SCHEMA
from tasks.data.dedup.schema import minhash_params
from tasks.data.ingest import doc_id_for
from tasks.data.minhash import MinHasher, MinHashParams, dedup_words, jaccard, shingle_set
from tasks.stages import run_stage
from tests.support.corpus import tiny_config

VOCAB = ["".join(random.Random(i).choices(string.ascii_lowercase, k=3 + i % 6)) for i in range(3000)]


def words(seed: int, n: int = 220) -> list[str]:
    return random.Random(seed).choices(VOCAB, k=n)


def edit(ws: list[str], fraction: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = list(ws)
    for i in rng.sample(range(len(out)), int(len(out) * fraction)):
        out[i] = rng.choice(VOCAB)
    return out


def lines(ws: list[str]) -> str:
    """Words as a file body with short lines (the clean stage drops long lines)."""
    return "\n".join(" ".join(ws[i : i + 12]) for i in range(0, len(ws), 12)) + "\n"


def write_docs(folder: Path, texts: list[tuple[str, ...]]) -> list[Path]:
    """Clean-stage-shaped shards from (doc_id, text[, source]) tuples."""
    rows = [
        {
            "doc_id": doc_id,
            "source": source[0] if source else "s",
            "locator": doc_id,
            "ordinal": i,
            "text": text,
            "n_bytes": len(text.encode()),
            "content_hash": f"{hash(text) & (2**64 - 1):032x}",
        }
        for i, (doc_id, text, *source) in enumerate(texts)
    ]
    with ParquetShardWriter(folder, "docs", CLEAN_SCHEMA, rows_per_shard=7) as writer:
        writer.write_rows(rows)
    return writer.paths


def run(tmp_path: Path, texts: list[tuple[str, str]], **cfg: object) -> tuple[dict, dict[str, dict], set[str]]:
    paths = write_docs(tmp_path / "in", texts)
    ctx = StageContext(out_dir=tmp_path / "out", work_dir=tmp_path / "work", log=lambda m: None)
    ctx.out_dir.mkdir()
    ctx.work_dir.mkdir()
    counts = dd.dedup(paths, DedupConfig(**cfg), ctx, batch_rows=5)
    ledger = {r["doc_id"]: r for r in pq.read_table(sorted((ctx.out_dir / "ledger").glob("*.parquet"))).to_pylist()}
    kept = set(pq.read_table(sorted((ctx.out_dir / "docs").glob("*.parquet"))).column("doc_id").to_pylist())
    return counts, ledger, kept


PLANTED = {  # variant name → how it is made from its original's words
    "noisy_copy": lambda ws: " ".join(ws).upper().replace(" ", " ,  ") + " 42",
    "truncated": lambda ws: " ".join(ws[: int(len(ws) * 0.9)]),
    "light_edit": lambda ws: " ".join(edit(ws, 0.01, 7)),
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    texts = [(f"orig-{i}", " ".join(words(i))) for i in range(12)]
    for i in range(0, 12, 3):
        for name, make in PLANTED.items():
            texts.append((f"{name}-{i}", make(words(i))))
    texts.append(("exact-0", texts[0][1]))
    return texts, run(tmp_path_factory.mktemp("planted"), texts)


def test_planted_near_duplicates_point_at_their_original(planted):
    texts, (counts, ledger, kept) = planted
    hasher = MinHasher(minhash_params(DedupConfig()))
    by_id = dict(texts)
    for i in range(0, 12, 3):
        for name in PLANTED:
            row = ledger[f"{name}-{i}"]
            assert (row["fate"], row["reason"], row["duplicate_of"]) == ("duplicate", "near_duplicate", f"orig-{i}")
            true = jaccard(shingle_set(hasher, by_id[row["doc_id"]]), shingle_set(hasher, by_id[f"orig-{i}"]))
            assert row["similarity"] == pytest.approx(true, abs=1e-6) and row["similarity"] >= 0.7
    assert ledger["exact-0"]["reason"] == "exact_duplicate" and ledger["exact-0"]["duplicate_of"] == "orig-0"
    assert kept == {f"orig-{i}" for i in range(12)}
    assert counts["dropped"] == {"exact_duplicate": 1, "near_duplicate": 12}


def test_distinct_documents_are_never_merged(tmp_path: Path):
    # Distinct texts that share a boilerplate header and footer (≈30% of their shingles) stay apart.
    boiler = " ".join(words(999, 40))
    texts = [(f"d{i}", f"{boiler} {' '.join(words(i, 160))} {boiler}") for i in range(40)]
    counts, ledger, kept = run(tmp_path, texts)
    assert counts["dropped"] == {} and len(kept) == 40
    assert counts["near_duplicates"]["verified_pairs"] == 0


def test_conservation_and_cluster_ids(planted):
    _, (counts, ledger, kept) = planted
    assert counts["docs_in"] == len(ledger) == counts["kept"] + sum(counts["dropped"].values())
    for row in ledger.values():
        if row["fate"] == "kept":
            assert row["cluster_id"] == row["doc_id"] and row["doc_id"] in kept
        else:  # a removed document's cluster (and so its split) is its kept representative's
            assert row["cluster_id"] == row["duplicate_of"] and row["duplicate_of"] in kept


def test_report_shows_threshold_and_s_curve(planted, tmp_path: Path):
    _, (counts, _, _) = planted
    near = counts["near_duplicates"]
    assert near["lsh_threshold"] == pytest.approx((1 / 20) ** (1 / 5), abs=1e-4)
    probs = [row["candidate_probability"] for row in near["s_curve"]]
    assert probs == sorted(probs) and probs[-1] > 0.99


def test_keep_policies_choose_the_representative(tmp_path: Path):
    base = words(5)
    texts = [("short", " ".join(base[:200])), ("long", " ".join(base)), ("edited", " ".join(edit(base, 0.01, 3)))]
    _, first, _ = run(tmp_path / "first", texts)
    assert first["long"]["duplicate_of"] == "short"
    _, longest, _ = run(tmp_path / "longest", texts, keep="longest")
    assert longest["short"]["duplicate_of"] == "long"
    sourced = [(doc_id, text, "web" if doc_id != "edited" else "books") for doc_id, text in texts]
    _, priority, _ = run(tmp_path / "priority", sourced, keep="source_priority", source_priority=["books"])
    assert priority["short"]["duplicate_of"] == priority["long"]["duplicate_of"] == "edited"


def test_connected_components_label_by_smallest_node():
    edges = np.array([[5, 3], [3, 9], [1, 2], [9, 7]])
    labels = dd.connected_components(11, edges)
    assert labels.tolist() == [0, 1, 1, 3, 4, 3, 6, 3, 8, 3, 10]


def test_minhash_estimates_jaccard_and_normalizes():
    hasher = MinHasher(MinHashParams(ngram=5, permutations=256, bands=32, rows=8))
    a = " ".join(words(1, 400))
    b = " ".join(edit(words(1, 400), 0.03, 1))
    sigs = hasher.signatures(*hasher.shingles([a, b]))
    assert np.mean(sigs[0] == sigs[1]) == pytest.approx(
        jaccard(shingle_set(hasher, a), shingle_set(hasher, b)), abs=0.08
    )
    assert dedup_words("Hello,  WORLD! v3.10_beta 2024") == ["hello", "world", "v0", "0", "beta", "0"]
    shingles, offsets = hasher.shingles(["", "two words", a])
    assert np.diff(offsets).tolist() == [0, 1, 396]


def test_banding_must_fit_the_signature():
    with pytest.raises(ValueError, match="exceeds dedup.permutations"):
        DedupConfig(permutations=64, bands=20, rows=5)


def _incremental_config(corpus: Path, root: Path, **dedup: object) -> PipelineConfig:
    """Only the docs source, and no quality filters: the synthetic word soup is not prose."""
    cfg = tiny_config(corpus, root, clean={"min_chars": 32, "default_preset": "none"})
    return cfg.model_copy(update={"sources": [cfg.sources[0]], "dedup": DedupConfig(**dedup)})


def test_incremental_run_matches_new_documents_against_the_earlier_index(tmp_path: Path):
    day1, day2 = tmp_path / "day1", tmp_path / "day2"
    for folder in (day1 / "docs", day2 / "docs"):
        folder.mkdir(parents=True)
    for i in range(6):
        (day1 / "docs" / f"old_{i}.txt").write_text(lines(words(i)))
    (day2 / "docs" / "copy_of_old_1.txt").write_text(lines(words(1)))  # exact copy of an indexed document
    (day2 / "docs" / "edit_of_old_2.txt").write_text(lines(edit(words(2), 0.01, 5)))  # near copy
    (day2 / "docs" / "fresh.txt").write_text(lines(words(77)))
    root = tmp_path / "root"

    def build(corpus: Path, **dedup: object):
        cfg = _incremental_config(corpus, root, **dedup)
        ingest, _ = run_stage("ingest", cfg, {}, log=lambda m: None)
        clean, _ = run_stage("clean", cfg, {"ingest": ingest}, log=lambda m: None)
        return run_stage("dedup", cfg, {"clean": clean}, log=lambda m: None)[0]

    first = build(day1)
    second = build(day2, against="latest")
    assert second.params["against"]["content_hash"] == first.content_hash
    rows = {r["doc_id"]: r for r in pq.read_table(second.files_under("ledger/")).to_pylist()}
    old_ids = {doc_id_for("docs", f"old_{i}.txt") for i in range(6)}
    copy, near = rows[doc_id_for("docs", "copy_of_old_1.txt")], rows[doc_id_for("docs", "edit_of_old_2.txt")]
    assert (copy["reason"], copy["duplicate_of"]) == ("exact_duplicate", doc_id_for("docs", "old_1.txt"))
    assert (near["reason"], near["duplicate_of"]) == ("near_duplicate", doc_id_for("docs", "old_2.txt"))
    assert near["similarity"] > 0.8
    assert second.counts["kept"] == 1 and second.counts["near_duplicates"]["matched_earlier_index"] == 2
    # The new index is cumulative: the earlier corpus plus today's one new document.
    indexed = pq.read_table(second.files_under("index/exact-")).column("doc_id").to_pylist()
    assert len(indexed) == 7 and old_ids < set(indexed)


def test_without_verification_the_minhash_estimate_decides(planted, tmp_path: Path):
    texts, (_, verified, _) = planted
    counts, ledger, kept = run(tmp_path, texts, verify=False)
    assert {d for d, r in ledger.items() if r["fate"] == "duplicate"} == {
        d for d, r in verified.items() if r["fate"] == "duplicate"
    }
    near = [r for r in ledger.values() if r["reason"] == "near_duplicate"]
    assert all(abs(r["similarity"] - verified[r["doc_id"]]["similarity"]) < 0.15 for r in near)


def test_incremental_run_over_the_whole_corpus_signs_only_unindexed_documents(tmp_path: Path):
    corpus = tmp_path / "corpus"
    (corpus / "docs").mkdir(parents=True)
    for i in range(5):
        (corpus / "docs" / f"old_{i}.txt").write_text(lines(words(i)))
    root = tmp_path / "root"

    def build(**dedup: object):
        cfg = _incremental_config(corpus, root, **dedup)
        ingest, _ = run_stage("ingest", cfg, {}, log=lambda m: None)
        clean, _ = run_stage("clean", cfg, {"ingest": ingest}, log=lambda m: None)
        return run_stage("dedup", cfg, {"clean": clean}, log=lambda m: None)[0]

    first = build()
    (corpus / "docs" / "new_edit_of_old_3.txt").write_text(lines(edit(words(3), 0.01, 9)))
    (corpus / "docs" / "new_fresh.txt").write_text(lines(words(55)))
    second = build(against=str(first.path))
    assert second.counts["near_duplicates"]["signed"] == 2  # the five indexed documents are not signed again
    assert second.counts["kept"] == 6 and second.counts["dropped"] == {"near_duplicate": 1}
    row = next(
        r
        for r in pq.read_table(second.files_under("ledger/")).to_pylist()
        if r["doc_id"] == doc_id_for("docs", "new_edit_of_old_3.txt")
    )
    assert row["duplicate_of"] == doc_id_for("docs", "old_3.txt")
