"""Pass 3, candidate pairs: documents sharing an LSH bucket (fanned out by band), and new documents matching the
index.

A bucket's members are ranked by node (the ``keep`` policy's order); each member is paired with the bucket's
best-ranked members, up to ``bucket_partners`` of them. Buckets of up to ``bucket_partners + 1`` documents
therefore give every pair, so a pair whose best-ranked bucket-mate fails verification is still checked against
the others; larger buckets (templates, boilerplate) cost at most ``bucket_partners`` pairs per member.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from storage.remote import register_object_fs
from tasks.data.dedup.index import PreviousIndex
from tasks.data.dedup.plan import Plan
from tasks.parts import map_parts

BANDS_PER_PART = 4  # the unit of fan-out: bands are independent, and part layout never depends on workers


@dataclass(frozen=True)
class BandPart:
    """Candidate pairs of some bands: every worker reads the same band files and keeps its own bands' rows."""

    band_files: tuple[str, ...]
    bands: tuple[int, ...]
    partners: int
    spill_dir: str | None = None


def band_pairs(part: BandPart) -> np.ndarray:
    """Bucket pairs (better-ranked node, other node) of the part's bands, distinct, shape (n, 2).

    One query per band: a band's buckets are independent of the others', so the window's hash table holds
    1/bands of the rows.
    """
    con = duckdb.connect()
    register_object_fs(con, part.band_files)
    if part.spill_dir:
        con.execute(f"SET temp_directory = '{part.spill_dir}'")
    found = [np.empty((0, 2), np.int64)]
    for band in part.bands:
        rows = con.execute(
            """
            WITH x AS (SELECT node, h FROM read_parquet($files) WHERE band = $band),
            ranked AS (
                SELECT h, node, row_number() OVER (PARTITION BY h ORDER BY node) AS r,
                       count(*) OVER (PARTITION BY h) AS m
                FROM x
            ),
            shared AS (SELECT h, node, r FROM ranked WHERE m > 1)
            SELECT a.node AS a, b.node AS b
            FROM shared a JOIN shared b ON a.h = b.h AND a.r < b.r
            WHERE a.r <= $partners
            """,
            {"files": list(part.band_files), "band": band, "partners": part.partners},
        ).fetchnumpy()
        if len(rows["a"]):
            found.append(np.stack([rows["a"], rows["b"]], axis=1).astype(np.int64))
    con.close()
    return np.unique(np.concatenate(found), axis=0)


def candidate_pairs(
    band_files: list[str], n_bands: int, partners: int, workers: int | None, spill_dir: Path | None = None
) -> np.ndarray:
    """Bucket pairs over all bands, distinct and sorted; bands fan out in groups of ``BANDS_PER_PART``."""
    files = tuple(str(f) for f in band_files)
    spill = str(spill_dir) if spill_dir else None
    parts = [
        BandPart(files, tuple(range(start, min(start + BANDS_PER_PART, n_bands))), partners, spill)
        for start in range(0, n_bands, BANDS_PER_PART)
    ]
    found = map_parts(band_pairs, parts, workers)
    return np.unique(np.concatenate([np.empty((0, 2), np.int64), *found]), axis=0)


def index_matches(
    con: duckdb.DuckDBPyConnection, band_files: list[str], previous: PreviousIndex, p: Plan
) -> tuple[list, np.ndarray]:
    """New documents that share a band with an indexed one: (old doc ids, edges (old number, new node))."""
    if not previous.band_files or not band_files:
        return [], np.empty((0, 2), np.int64)
    register_object_fs(con, band_files)
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
        {"bands": [str(f) for f in band_files]},
    ).fetchnumpy()
    con.unregister("node_doc")
    old_ids = sorted(set(rows["old"].tolist()))
    number = {d: i for i, d in enumerate(old_ids)}
    edges = np.stack(
        [np.asarray([number[d] for d in rows["old"].tolist()], np.int64), rows["node"].astype(np.int64)], 1
    )
    return old_ids, edges.reshape(-1, 2)
