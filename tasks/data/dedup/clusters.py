"""Pass 4, verify and cluster: exact Jaccard of candidate pairs, connected components of the rest."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from storage.shards import iter_batches
from tasks.config import DedupConfig
from tasks.data.dedup.index import PreviousIndex
from tasks.data.minhash import (
    MinHasher,
    jaccard,
)


def texts_by_position(doc_paths: list[Path], positions: np.ndarray, batch_rows: int) -> Iterator[tuple[int, str]]:
    """Stream (position, text) for the given sorted input positions."""
    wanted = np.zeros(int(positions.max()) + 1 if len(positions) else 0, bool)
    wanted[positions] = True
    pos = 0
    for batch in iter_batches(doc_paths, columns=["text"], batch_size=batch_rows):
        n = batch.num_rows
        hit = np.flatnonzero(wanted[pos : pos + n])
        if len(hit):
            texts = batch.column("text")
            for i in hit:
                yield pos + int(i), texts[int(i)].as_py()
        pos += n
        if pos >= len(wanted):
            return


def old_texts(con: duckdb.DuckDBPyConnection, previous: PreviousIndex, old_ids: list[str]) -> dict[str, str]:
    """Texts of indexed documents, read from the artifacts that hold them."""
    con.register("wanted", pa.table({"doc_id": old_ids}))
    holder_of = dict(
        con.execute(
            f"SELECT doc_id, min(holder) FROM read_parquet({[str(f) for f in previous.exact_files]!r}) "
            "WHERE doc_id IN (SELECT doc_id FROM wanted) GROUP BY 1"
        ).fetchall()
    )
    texts: dict[str, str] = {}
    for number, holder in enumerate(previous.holders()):
        ids = [d for d, h in holder_of.items() if h == number]
        docs = sorted((holder / "docs").glob("*.parquet"))
        if not ids or not docs:
            continue
        con.register("wanted", pa.table({"doc_id": ids}))
        rows = con.execute(
            f"SELECT doc_id, text FROM read_parquet({[str(d) for d in docs]!r}) "
            "WHERE doc_id IN (SELECT doc_id FROM wanted)"
        ).fetchall()
        texts.update(rows)
    con.unregister("wanted")
    missing = set(old_ids) - texts.keys()
    if missing:
        raise ValueError(
            f"dedup.against: {len(missing)} indexed documents (e.g. {sorted(missing)[0]}) have no text in the "
            "artifacts the index names; were earlier dedup artifacts deleted?"
        )
    return texts


def connected_components(n: int, edges: np.ndarray) -> np.ndarray:
    """Label of every node = the smallest node of its component (vectorized hook-and-jump union-find)."""
    labels = np.arange(n, dtype=np.int64)
    if len(edges) == 0:
        return labels
    a, b = edges[:, 0], edges[:, 1]
    while True:
        la, lb = labels[a], labels[b]
        if np.array_equal(la, lb):
            return labels
        low = np.minimum(la, lb)
        np.minimum.at(labels, la, low)
        np.minimum.at(labels, lb, low)
        while True:  # pointer jumping until every node points at a root
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped


@dataclass
class Clusters:
    """Near-duplicate decisions for signed nodes: representative (graph node) and similarity to it."""

    rep: dict[int, int] = field(default_factory=dict)  # graph node → representative graph node
    similarity: dict[int, float] = field(default_factory=dict)
    candidate_pairs: int = 0
    verified_pairs: int = 0


def verify_and_cluster(
    edges: np.ndarray,
    n_old: int,
    texts: dict[int, str],
    hasher: MinHasher,
    cfg: DedupConfig,
) -> Clusters:
    """Keep candidate pairs at or above the threshold, cluster them, pick representatives (old nodes first).

    Graph nodes: ``0..n_old-1`` are indexed documents, ``n_old + node`` are this run's documents, so the
    smallest node of a component is an indexed document whenever the component has one.
    """
    result = Clusters(candidate_pairs=len(edges))
    if len(edges) == 0:
        return result
    involved = np.unique(edges)
    sets: dict[int, np.ndarray] = {}
    sigs: dict[int, np.ndarray] = {}
    for start in range(0, len(involved), cfg.batch_docs):  # batches bound the shingling's working memory
        chunk = involved[start : start + cfg.batch_docs].tolist()
        shingles, offsets = hasher.shingles([texts.pop(g) for g in chunk])
        sets.update((g, np.unique(shingles[offsets[i] : offsets[i + 1]])) for i, g in enumerate(chunk))
        if not cfg.verify:
            sigs.update(zip(chunk, hasher.signatures(shingles, offsets), strict=True))

    def similarity(x: int, y: int) -> float:
        if cfg.verify:
            return jaccard(sets[x], sets[y])
        return float(np.mean(sigs[x] == sigs[y]))

    sims = np.fromiter((similarity(int(x), int(y)) for x, y in edges), float, len(edges))
    keep = sims >= cfg.threshold
    kept_edges = edges[keep]
    result.verified_pairs = int(keep.sum())
    labels = connected_components(int(involved.max()) + 1, kept_edges)
    # A new document matched directly to indexed ones records the most similar of them.
    best_old: dict[int, tuple[float, int]] = {}
    for (x, y), s in zip(kept_edges.tolist(), sims[keep].tolist(), strict=True):
        if x < n_old <= y and s > best_old.get(y, (-1.0, 0))[0]:
            best_old[y] = (s, x)
    for g in involved.tolist():
        if g < n_old or labels[g] == g:
            continue  # indexed documents stay; a component's smallest node represents it
        rep = best_old[g][1] if g in best_old else int(labels[g])
        result.rep[g] = rep
        result.similarity[g] = round(similarity(g, rep), 6)
    return result
