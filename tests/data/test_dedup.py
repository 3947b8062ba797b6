"""Dedup on small synthetic corpora: planted near-duplicates, distinct documents, clusters, incremental runs."""

from __future__ import annotations

import random
import string
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app
from storage.artifacts import ArtifactStore, StageContext
from storage.lineage import LineageStore
from storage.lineage_queries import LineageQueries
from storage.shards import ParquetShardWriter
from tasks.config import DedupConfig, PipelineConfig
from tasks.data import dedup as dd
from tasks.data.clean import CLEAN_SCHEMA
from tasks.data.dedup.candidates import BandPart, band_pairs
from tasks.data.dedup.clusters import cluster
from tasks.data.dedup.schema import WORK_BANDS_SCHEMA, minhash_params
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
            assert row["cluster_id"] in kept and row["duplicate_of"] in ledger


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


def _band_file(path: Path, rows: list[tuple[int, int, int]]) -> str:
    """A work band file of (node, band, hash) rows."""
    columns = {name: [row[i] for row in rows] for i, name in enumerate(("node", "band", "h"))}
    pq.write_table(pa.table(columns, schema=WORK_BANDS_SCHEMA), path)
    return str(path)


def test_every_pair_of_a_bucket_can_reach_verification(tmp_path: Path):
    # One bucket {0, 1, 2}: its best-ranked member 0 is a sibling variant; the pair (1, 2) must still be a candidate.
    three = _band_file(tmp_path / "three.parquet", [(0, 0, 7), (1, 0, 7), (2, 0, 7), (3, 0, 8)])
    assert band_pairs(BandPart((three,), (0,), partners=16)).tolist() == [[0, 1], [0, 2], [1, 2]]
    assert band_pairs(BandPart((three,), (0,), partners=1)).tolist() == [[0, 1], [0, 2]]  # the old star
    # A large bucket is bounded: each member pairs with at most `partners` better-ranked members.
    big = _band_file(tmp_path / "big.parquet", [(node, 0, 1) for node in range(30)])
    pairs = band_pairs(BandPart((big,), (0,), partners=4))
    assert len(pairs) == sum(min(rank, 4) for rank in range(30)) and set(pairs[:, 0].tolist()) == {0, 1, 2, 3}


def test_a_chain_records_the_pair_that_linked_each_document():
    # 0~1 and 1~2 verified, 0~2 below the threshold: 2 joins 0's cluster through 1.
    edges = np.array([[0, 1], [0, 2], [1, 2], [3, 4]])
    result = cluster(edges, np.array([0.9, 0.5, 0.8, 0.75]), n_old=0, threshold=0.7)
    assert result.rep == {1: 0, 2: 0, 4: 3}
    assert result.link == {1: 0, 2: 1, 4: 3}
    assert result.similarity == {1: 0.9, 2: 0.8, 4: 0.75}
    # An indexed node (n_old=1: node 0) always represents its component; a node next to two roots links to the
    # more similar one.
    both = cluster(np.array([[0, 2], [1, 2]]), np.array([0.8, 0.9]), n_old=2, threshold=0.7)
    assert both.link == {2: 1} and both.rep == {2: 1}


def _chain_texts() -> list[tuple[str, str]]:
    """a, b, c: sliding windows over one text; a~b and b~c above 0.7, a~c below it."""
    ws = words(11, 260)
    return [("a", " ".join(ws[0:200])), ("b", " ".join(ws[22:222])), ("c", " ".join(ws[44:244]))]


def test_a_document_removed_through_a_chain_names_its_link_and_its_representative(tmp_path: Path):
    hasher = MinHasher(minhash_params(DedupConfig()))
    texts = dict(_chain_texts())
    sim = {(x, y): jaccard(shingle_set(hasher, texts[x]), shingle_set(hasher, texts[y])) for x, y in ["ab", "bc", "ac"]}
    assert sim["a", "b"] >= 0.7 and sim["b", "c"] >= 0.7 and sim["a", "c"] < 0.7
    _, ledger, kept = run(tmp_path, _chain_texts())
    assert kept == {"a"}
    c = ledger["c"]
    assert (c["reason"], c["duplicate_of"], c["cluster_id"]) == ("near_duplicate", "b", "a")
    assert c["similarity"] == pytest.approx(sim["b", "c"], abs=1e-6)


def test_lineage_why_shows_the_chain(tmp_path: Path):
    corpus = tmp_path / "corpus" / "docs"
    corpus.mkdir(parents=True)
    for name, text in _chain_texts():
        (corpus / f"{name}.txt").write_text(lines(text.split()))
    cfg = _incremental_config(corpus.parent, tmp_path / "root")
    lineage = LineageStore(ArtifactStore(cfg.root).lineage_path)
    lineage.start_run("run-chain", cfg.name, cfg.model_dump(), cfg.seed, None)
    manifests: dict = {}
    for stage, upstream in (("ingest", {}), ("clean", {"ingest"}), ("dedup", {"clean"})):
        started = datetime.now(UTC)
        manifests[stage], _ = run_stage(stage, cfg, {u: manifests[u] for u in upstream}, log=lambda m: None)
        lineage.record_stage("run-chain", stage, "completed", started, manifest=manifests[stage])
    lineage.finish_run("run-chain", "completed")
    c_id = doc_id_for("docs", "c.txt")
    why = LineageQueries(lineage).why(c_id, "run-chain")
    assert (why["duplicate_of_locator"], why["cluster_locator"]) == ("b.txt", "a.txt") and why["similarity"] >= 0.7
    out = CliRunner().invoke(app, ["lineage", "why", c_id, "--root", str(cfg.root), "--run", "run-chain"])
    assert out.exit_code == 0, out.output
    assert "b.txt" in out.output and "linked through a chain" in out.output and "a.txt" in out.output


def test_number_folding_is_an_option():
    table = "round 1 score 12 to 7\n" * 30
    other = table.replace("12 to 7", "31 to 2")
    folded, kept_apart = (
        MinHasher(minhash_params(DedupConfig())),
        MinHasher(minhash_params(DedupConfig(fold_numbers=False))),
    )
    assert jaccard(shingle_set(folded, table), shingle_set(folded, other)) == 1.0
    assert jaccard(shingle_set(kept_apart, table), shingle_set(kept_apart, other)) < 0.7
    assert dedup_words("v3.10 2024", fold_numbers=False) == ["v3", "10", "2024"]
    # The default keeps the band hashes of earlier indexes comparable; turning it off is checked against them.
    assert "fold_numbers" not in dd.index.index_signature(minhash_params(DedupConfig()))
    assert dd.index.index_signature(minhash_params(DedupConfig(fold_numbers=False)))["fold_numbers"] is False


def test_dedup_reports_progress_per_signing_part_then_per_pass(tmp_path: Path):
    texts = [(f"d{i}", " ".join(words(i))) for i in range(20)]  # 3 input shards of ≤7 rows: 3 signing parts
    paths = write_docs(tmp_path / "in", texts)
    seen: list[tuple[float, str]] = []
    ctx = StageContext(
        tmp_path / "out", tmp_path / "work", log=lambda m: None, progress=lambda f, m: seen.append((f, m))
    )
    ctx.out_dir.mkdir()
    ctx.work_dir.mkdir()
    dd.dedup(paths, DedupConfig(), ctx, batch_rows=5)
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    messages = [m for _, m in seen]
    assert [m for m in messages if m.startswith("sign parts")] == ["sign parts 1/3", "sign parts 2/3", "sign parts 3/3"]
    assert messages[-1] == "write done"
