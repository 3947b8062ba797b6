"""Dedup: remove exact duplicates (identical normalized text) with DuckDB over the clean Parquet shards.

DuckDB does the set work (a window over content hashes, spilling to disk past RAM); the kept documents are
then streamed shard by shard in their original order, so output bytes are deterministic. Every removed
document records ``duplicate_of``: the kept representative.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import duckdb

from storage.artifacts import StageContext
from storage.shards import LedgerWriter, ParquetShardWriter, iter_batches
from tasks.clean import CLEAN_SCHEMA
from tasks.config import DedupConfig

VERSION = "1"

_ORDER = {"first": "ordinal", "longest": "n_bytes DESC, ordinal"}


def exact_duplicates(doc_paths: list[Path], keep: str) -> dict[str, str]:
    """Map each exact duplicate's doc_id to its group's representative (the kept copy)."""
    if not doc_paths:
        return {}
    con = duckdb.connect()
    files = [str(p) for p in doc_paths]
    rows = con.execute(
        f"""
        SELECT doc_id, representative FROM (
            SELECT doc_id,
                   first_value(doc_id) OVER (PARTITION BY content_hash ORDER BY {_ORDER[keep]}) AS representative
            FROM read_parquet(?)
        ) WHERE doc_id <> representative
        """,
        [files],
    ).fetchall()
    con.close()
    return dict(rows)


def dedup(doc_paths: list[Path], cfg: DedupConfig, ctx: StageContext, batch_rows: int = 1024) -> dict:
    """Write the unique documents to ``docs/`` and a ledger row (kept / duplicate) per input document."""
    duplicate_of = exact_duplicates(doc_paths, cfg.keep) if cfg.exact else {}
    docs = ParquetShardWriter(ctx.out_dir / "docs", "docs", CLEAN_SCHEMA)
    ledger = LedgerWriter(ctx.out_dir / "ledger", "dedup")
    reasons: Counter[str] = Counter()
    docs_in = 0
    for batch in iter_batches(doc_paths, batch_size=batch_rows):
        kept: list[dict] = []
        rows: list[dict] = []
        for doc in batch.to_pylist():
            docs_in += 1
            representative = duplicate_of.get(doc["doc_id"])
            row = {"doc_id": doc["doc_id"], "source": doc["source"], "content_hash": doc["content_hash"]}
            if representative is None:
                kept.append(doc)
                rows.append(row | {"fate": "kept"})
            else:
                reasons["exact_duplicate"] += 1
                rows.append(
                    row
                    | {
                        "fate": "duplicate",
                        "reason": "exact_duplicate",
                        "duplicate_of": representative,
                        "similarity": 1.0,
                    }
                )
        docs.write_rows(kept)
        ledger.record(rows)
    docs.close()
    ledger.close()
    return {"docs_in": docs_in, "kept": docs.rows, "dropped": dict(reasons)}
