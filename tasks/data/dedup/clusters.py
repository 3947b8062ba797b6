"""Pass 4, verify and cluster: exact Jaccard of candidate pairs (fanned out), connected components of the rest.

Graph nodes: ``0..n_old-1`` are indexed documents, ``n_old + node`` are this run's documents, so the smallest
node of a component is an indexed document whenever the component has one.

Verification is a map over groups of pairs: each part reads the texts of its pairs' documents from the input
shards itself (the flow process sends positions, not texts) and returns one similarity per pair. Clustering
stays in one process, over the verified pairs only: labels are one int64 per node in a pair.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.remote import open_input
from tasks.config import DedupConfig
from tasks.data.dedup.index import PreviousIndex
from tasks.data.minhash import MinHasher, MinHashParams, jaccard
from tasks.parts import map_parts

PAIRS_PER_PART = 50_000  # part layout depends on the pair count alone, never on the workers


def texts_by_position(doc_paths: list[str], positions: np.ndarray, batch_rows: int) -> Iterator[tuple[int, str]]:
    """Stream (position, text) for the given sorted input positions, reading only the shards that hold them."""
    start = 0
    for path in doc_paths:
        pf = pq.ParquetFile(open_input(path))
        rows = pf.metadata.num_rows
        lo, hi = np.searchsorted(positions, [start, start + rows])
        if hi > lo:
            local = positions[lo:hi] - start
            offset = 0
            for batch in pf.iter_batches(batch_size=batch_rows, columns=["text"]):
                hit = local[(local >= offset) & (local < offset + batch.num_rows)]
                if len(hit):
                    texts = batch.column("text").take(pa.array(hit - offset)).to_pylist()
                    yield from zip((start + hit).tolist(), texts, strict=True)
                offset += batch.num_rows
        start += rows
        if start > (positions[-1] if len(positions) else -1):
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


@dataclass(frozen=True)
class VerifyPart:
    """Pairs of graph nodes to verify, where their texts are, and (incremental runs) indexed documents' texts."""

    edges: np.ndarray  # (m, 2) graph nodes
    nodes: np.ndarray  # sorted new graph nodes of the pairs
    positions: np.ndarray  # their input positions
    doc_paths: tuple[str, ...]
    old: dict[int, str]  # indexed graph node → text
    params: MinHashParams
    verify: bool
    batch_docs: int


def verify_part(part: VerifyPart) -> np.ndarray:
    """The similarity of each pair: exact Jaccard of shingle sets, or (``verify: false``) the MinHash estimate."""
    hasher = MinHasher(part.params)
    order = np.argsort(part.positions, kind="stable")
    node_at = dict(zip(part.positions[order].tolist(), part.nodes[order].tolist(), strict=True))
    texts = dict(part.old)
    texts.update(
        (node_at[pos], text)
        for pos, text in texts_by_position(list(part.doc_paths), part.positions[order], part.batch_docs)
    )
    involved = sorted(texts)
    sets: dict[int, np.ndarray] = {}
    sigs: dict[int, np.ndarray] = {}
    for start in range(0, len(involved), part.batch_docs):  # batches bound the shingling's working memory
        chunk = involved[start : start + part.batch_docs]
        shingles, offsets = hasher.shingles([texts.pop(g) for g in chunk])
        if part.verify:
            sets.update((g, np.unique(shingles[offsets[i] : offsets[i + 1]])) for i, g in enumerate(chunk))
        else:
            sigs.update(zip(chunk, hasher.signatures(shingles, offsets), strict=True))
    if part.verify:
        return np.fromiter((jaccard(sets[x], sets[y]) for x, y in part.edges.tolist()), float, len(part.edges))
    return np.fromiter((float(np.mean(sigs[x] == sigs[y])) for x, y in part.edges.tolist()), float, len(part.edges))


def similarities(
    edges: np.ndarray,
    n_old: int,
    pos_of_node: np.ndarray,
    doc_paths: list[str],
    old: dict[int, str],
    params: MinHashParams,
    cfg: DedupConfig,
    workers: int | None,
) -> np.ndarray:
    """The similarity of every candidate pair, verified in parts of ``PAIRS_PER_PART`` pairs."""
    if len(edges) == 0:
        return np.empty(0, float)
    parts = []
    for start in range(0, len(edges), PAIRS_PER_PART):
        chunk = edges[start : start + PAIRS_PER_PART]
        involved = np.unique(chunk)
        new = involved[involved >= n_old]
        parts.append(
            VerifyPart(
                edges=chunk,
                nodes=new,
                positions=pos_of_node[new - n_old],
                doc_paths=tuple(str(p) for p in doc_paths),
                old={g: old[g] for g in involved[involved < n_old].tolist()},
                params=params,
                verify=cfg.verify,
                batch_docs=cfg.batch_docs,
            )
        )
    return np.concatenate(map_parts(verify_part, parts, workers))


@dataclass
class Clusters:
    """Near-duplicate decisions for this run's graph nodes that are removed.

    ``rep``: the component's representative (kept, or indexed); ``link``: the node whose verified pair with
    this one put it in the cluster (the representative itself, or a node on the way to it through a chain);
    ``similarity``: the similarity of that pair (always at or above the threshold).
    """

    rep: dict[int, int] = field(default_factory=dict)
    link: dict[int, int] = field(default_factory=dict)
    similarity: dict[int, float] = field(default_factory=dict)
    candidate_pairs: int = 0
    verified_pairs: int = 0


def cluster(edges: np.ndarray, sims: np.ndarray, n_old: int, threshold: float) -> Clusters:
    """Components of the pairs at or above ``threshold``; every removed node is linked to its nearest root.

    Roots are indexed documents and each component's smallest node (its best-ranked document). A breadth-first
    search from the roots over verified pairs gives each other node the pair that links it: a neighbour one
    step closer to a root, the most similar one (ties: the smaller node). A node next to a root links to it.
    """
    result = Clusters(candidate_pairs=len(edges))
    keep = sims >= threshold
    kept, kept_sims = edges[keep], sims[keep]
    result.verified_pairs = int(keep.sum())
    if not len(kept):
        return result
    n = int(kept.max()) + 1
    labels = connected_components(n, kept)
    involved = np.unique(kept)
    depth = np.full(n, -1, np.int64)
    roots = involved[(involved < n_old) | (labels[involved] == involved)]
    depth[roots] = 0
    root_of = np.arange(n, dtype=np.int64)
    # Both directions of every verified pair: (from, to, similarity).
    src = np.concatenate([kept[:, 0], kept[:, 1]])
    dst = np.concatenate([kept[:, 1], kept[:, 0]])
    sim = np.concatenate([kept_sims, kept_sims])
    level = 0
    while True:
        step = (depth[src] == level) & (depth[dst] == -1)
        if not step.any():
            break
        s, d, w = src[step], dst[step], sim[step]
        order = np.lexsort((s, -w, d))  # per target: most similar first, then the smaller source
        d, s, w = d[order], s[order], w[order]
        first = np.concatenate([[True], d[1:] != d[:-1]])
        d, s, w = d[first], s[first], w[first]
        depth[d] = level + 1
        root_of[d] = root_of[s]
        for node, via, similarity in zip(d.tolist(), s.tolist(), w.tolist(), strict=True):
            result.link[node] = via
            result.similarity[node] = round(similarity, 6)
            result.rep[node] = int(root_of[node])
        level += 1
    return result
