"""Pass 1, plan with DuckDB (no text read): rank documents, find exact duplicates, anti-join the index."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from tasks.config import DedupConfig
from tasks.data.dedup.index import PreviousIndex
from tasks.data.dedup.schema import RANK


@dataclass
class Plan:
    """Per-document decisions, as arrays indexed by ``node`` (the document's rank under the keep policy)."""

    doc_id: np.ndarray  # object array of str
    pos_of_node: np.ndarray  # input position of each node
    node_of_pos: np.ndarray
    indexed: np.ndarray  # bool: already in the earlier index (kept as is, not signed again)
    exact_rep: np.ndarray  # node of the exact-duplicate group's representative (itself when unique)
    old_exact: np.ndarray  # object: doc_id in the earlier index with identical content, else None

    @property
    def to_sign(self) -> np.ndarray:
        no_old_copy = np.fromiter((d is None for d in self.old_exact), bool, len(self.old_exact))
        return ~self.indexed & (self.exact_rep == np.arange(len(self.doc_id))) & no_old_copy


def plan(con: duckdb.DuckDBPyConnection, doc_paths: list[Path], cfg: DedupConfig, previous: PreviousIndex | None):
    files = [str(p) for p in doc_paths]
    old = "SELECT NULL::VARCHAR AS doc_id, NULL::VARCHAR AS content_hash LIMIT 0"
    if previous is not None and previous.exact_files:
        old = f"SELECT doc_id, content_hash FROM read_parquet({[str(p) for p in previous.exact_files]!r})"
    params: dict[str, Any] = {"files": files}
    if cfg.keep == "source_priority":
        params["priority"] = cfg.source_priority
    exact = "min(node) OVER (PARTITION BY content_hash)" if cfg.exact else "node"
    old_exact = "e.old_doc" if cfg.exact else "NULL::VARCHAR"
    table = con.sql(
        f"""
        WITH old AS ({old}),
        raw AS (
            SELECT d.doc_id, d.source, d.ordinal, d.n_bytes, d.content_hash,
                   list_position($files, d.filename) AS file_no, d.file_row_number AS row_no,
                   i.doc_id IS NOT NULL AS indexed
            FROM read_parquet($files, filename = true, file_row_number = true) d
            LEFT JOIN (SELECT DISTINCT doc_id, content_hash FROM old) i
                   ON i.doc_id = d.doc_id AND i.content_hash = d.content_hash
        ),
        ranked AS (
            SELECT *, row_number() OVER (ORDER BY file_no, row_no) - 1 AS pos,
                      row_number() OVER (ORDER BY NOT indexed, {RANK[cfg.keep]}) - 1 AS node
            FROM raw
        )
        SELECT r.node, r.pos, r.doc_id, r.indexed, {exact} AS exact_rep,
               CASE WHEN r.indexed THEN NULL ELSE {old_exact} END AS old_exact
        FROM ranked r
        LEFT JOIN (SELECT content_hash, min(doc_id) AS old_doc FROM old GROUP BY 1) e USING (content_hash)
        ORDER BY r.node
        """,
        params=params,
    ).to_arrow_table()
    n = table.num_rows
    pos_of_node = table.column("pos").to_numpy().astype(np.int64)
    node_of_pos = np.empty(n, np.int64)
    node_of_pos[pos_of_node] = np.arange(n)
    return Plan(
        doc_id=np.asarray(table.column("doc_id").to_pylist(), dtype=object),
        pos_of_node=pos_of_node,
        node_of_pos=node_of_pos,
        indexed=table.column("indexed").to_numpy(zero_copy_only=False).astype(bool),
        exact_rep=table.column("exact_rep").to_numpy().astype(np.int64),
        old_exact=np.asarray(table.column("old_exact").to_pylist(), dtype=object),
    )
