"""The ledger at rest: sorted range-partitioned parts, point lookups, link lookups and rollups."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

import storage.ledger as ledger_mod
from storage.ledger import INDEX_DIR, LedgerIndex, compact_ledger
from storage.shards import LedgerWriter


@pytest.fixture()
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny parts and row groups, so a few hundred rows exercise many part and row-group boundaries."""
    monkeypatch.setattr(ledger_mod, "PART_ROWS", 64)
    monkeypatch.setattr(ledger_mod, "ROW_GROUP", 8)


def _fragments(folder: Path, n: int = 500) -> list[Path]:
    """Unsorted ledger fragments over three sources; some documents have two rows (two locators)."""
    rng = random.Random(7)
    rows = []
    for i in range(n):
        src = ("web", "books", "code")[i % 3]
        doc = f"{src}:{hashlib.sha1(str(i).encode()).hexdigest()[:16]}"
        dup = i % 10 == 3
        rows.append(
            {
                "doc_id": doc,
                "source": src,
                "locator": f"f{i // 50}:{i}",
                "content_hash": hashlib.md5(str(i % 400).encode()).hexdigest(),  # 100 shared hashes
                "fate": "duplicate" if dup else "kept",
                "reason": "near_duplicate" if dup else None,
                "duplicate_of": f"web:{hashlib.sha1(b'0').hexdigest()[:16]}" if dup else None,
                "split": "train" if i % 5 else "val",
                "shard": f"train-{i % 4:05d}",
                "token_start": i * 10,
                "token_end": i * 10 + 7,
            }
        )
        if i % 17 == 0:  # a second row for the same document
            rows.append(rows[-1] | {"locator": rows[-1]["locator"] + "b"})
    rng.shuffle(rows)
    writer = LedgerWriter(folder, "dedup")
    for start in range(0, len(rows), 97):
        writer.record(rows[start : start + 97])
        writer.close_shard()
    return writer.close()


def _scan(files: list[Path], where: str, params: list) -> list[dict]:
    con = duckdb.connect()
    rel = con.execute(
        f"SELECT * FROM read_parquet(?) WHERE {where} ORDER BY doc_id, stage, locator",
        [[str(f) for f in files], *params],
    )
    cols = [d[0] for d in rel.description]
    return [dict(zip(cols, r, strict=True)) for r in rel.fetchall()]


def test_parts_are_sorted_ranges_and_lookups_match_a_full_scan(tmp_path: Path, small_parts: None):
    frags = _fragments(tmp_path / "frags")
    art = tmp_path / "art"
    parts = compact_ledger(frags, art / "ledger", links=("content_hash", "duplicate_of"))
    assert len(parts) > 5 and all(pq.ParquetFile(p).metadata.num_rows <= 64 for p in parts)
    assert max(pq.ParquetFile(p).metadata.row_group(0).num_rows for p in parts) == 8
    every = _scan(parts, "TRUE", [])
    assert [r["doc_id"] for r in every] == sorted(r["doc_id"] for r in every)
    assert len(every) == sum(pq.ParquetFile(p).metadata.num_rows for p in frags)

    index = LedgerIndex(art)
    assert index.indexed
    ids = sorted({r["doc_id"] for r in every})
    multi = [d for d in ids if sum(r["doc_id"] == d for r in every) == 2]
    for doc in [ids[0], ids[-1], *multi, *random.Random(1).sample(ids, 40), "web:missing", "zzz"]:
        assert index.rows([doc]) == [r for r in every if r["doc_id"] == doc], doc
    batch = random.Random(2).sample(ids, 60)
    assert index.rows(batch, ["doc_id", "shard"]) == [
        {"doc_id": r["doc_id"], "shard": r["shard"]} for r in every if r["doc_id"] in set(batch)
    ]

    some_hash = every[5]["content_hash"]
    assert sorted(index.linked([some_hash], "content_hash")) == sorted(
        r["doc_id"] for r in every if r["content_hash"] == some_hash
    )
    rep = next(r["duplicate_of"] for r in every if r["duplicate_of"])
    assert sorted(index.linked([rep], "duplicate_of")) == sorted(r["doc_id"] for r in every if r["duplicate_of"] == rep)
    assert index.linked([rep], "content_hash") == []

    rollup = index.rollup().to_pylist()
    assert sum(r["docs"] for r in rollup) == len(every)
    web_tokens = sum(r["token_end"] - r["token_start"] for r in every if r["source"] == "web")
    assert sum(r["tokens"] for r in rollup if r["source"] == "web") == web_tokens
    lo, hi = "code:", "code;"
    in_range = index.files_between(lo, hi)
    assert 0 < len(in_range) < len(parts)
    assert _scan([Path(f) for f in in_range], "doc_id >= ? AND doc_id < ?", [lo, hi]) == [
        r for r in every if r["source"] == "code"
    ]


def test_compaction_is_byte_identical_and_an_unindexed_ledger_still_answers(tmp_path: Path, small_parts: None):
    frags = _fragments(tmp_path / "frags")
    for name in ("a", "b"):
        compact_ledger(frags, tmp_path / name / "ledger", links=("content_hash",))
    a_files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert a_files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for rel in a_files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel

    indexed = LedgerIndex(tmp_path / "a")
    shutil.rmtree(tmp_path / "b" / INDEX_DIR)
    legacy = LedgerIndex(tmp_path / "b")
    assert not legacy.indexed
    doc = indexed.rows([_scan(indexed.parts, "TRUE", [])[123]["doc_id"]])
    assert legacy.rows([doc[0]["doc_id"]]) == doc
    h = doc[0]["content_hash"]
    assert sorted(legacy.linked([h], "content_hash")) == sorted(indexed.linked([h], "content_hash"))
    assert legacy.rollup().to_pylist() == indexed.rollup().to_pylist()


def test_an_empty_ledger_has_one_empty_part_and_an_empty_rollup(tmp_path: Path):
    compact_ledger([], tmp_path / "ledger")
    index = LedgerIndex(tmp_path)
    assert len(index.parts) == 1 and pq.ParquetFile(index.parts[0]).metadata.num_rows == 0
    assert index.rows(["web:x"]) == [] and index.rollup().num_rows == 0 and index.linked(["x"], "content_hash") == []
