"""Pass 3, candidate pairs: documents sharing an LSH bucket, and new documents matching the index."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from tasks.data.dedup.index import PreviousIndex
from tasks.data.dedup.plan import Plan


def candidate_pairs(con: duckdb.DuckDBPyConnection, bands: Path, n_bands: int) -> np.ndarray:
    """Star edges (bucket's best-ranked node, other member) over all band buckets, distinct, shape (n, 2).

    One query per band: a band's buckets are independent of the others', so the group-by's hash table holds
    1/bands of the rows (and at scale, bands are the unit that fans out over machines).
    """
    found = [np.empty((0, 2), np.int64)]
    for band in range(n_bands):
        rows = con.execute(
            """
            WITH x AS (SELECT node, h FROM read_parquet($bands) WHERE band = $band),
            buckets AS (SELECT h, min(node) AS root FROM x GROUP BY h HAVING count(*) > 1)
            SELECT b.root AS a, x.node AS b FROM x JOIN buckets b USING (h) WHERE x.node <> b.root
            """,
            {"bands": str(bands), "band": band},
        ).fetchnumpy()
        if len(rows["a"]):
            found.append(np.stack([rows["a"], rows["b"]], axis=1).astype(np.int64))
    return np.unique(np.concatenate(found), axis=0)


def index_matches(
    con: duckdb.DuckDBPyConnection, bands: Path, previous: PreviousIndex, p: Plan
) -> tuple[list, np.ndarray]:
    """New documents that share a band with an indexed one: (old doc ids, edges (old number, new node))."""
    if not previous.band_files:
        return [], np.empty((0, 2), np.int64)
    con.register("node_doc", pa.table({"node": np.arange(len(p.doc_id)), "doc_id": p.doc_id.tolist()}))
    rows = con.execute(
        f"""
        SELECT DISTINCT o.doc_id AS old, x.node AS node
        FROM read_parquet($bands) x
        JOIN read_parquet({[str(f) for f in previous.band_files]!r}) o USING (band, h)
        JOIN node_doc n ON n.node = x.node
        WHERE o.doc_id <> n.doc_id
        ORDER BY old, node
        """,
        {"bands": str(bands)},
    ).fetchnumpy()
    con.unregister("node_doc")
    old_ids = sorted(set(rows["old"].tolist()))
    number = {d: i for i, d in enumerate(old_ids)}
    edges = np.stack(
        [np.asarray([number[d] for d in rows["old"].tolist()], np.int64), rows["node"].astype(np.int64)], 1
    )
    return old_ids, edges.reshape(-1, 2)
