"""Dedup: exact duplicates by content hash, near-duplicates by MinHash LSH, incrementally against an index.

The stage runs in passes over the clean Parquet shards, each bounded in memory:

1. **Plan** (DuckDB, no text read): rank documents by the ``keep`` policy, find exact duplicates with a window
   over ``content_hash`` and, given an earlier index, anti-join against its exact hashes.
2. **Sign** (NumPy, fans out over worker processes): documents left after exact dedup get MinHash band hashes
   (see ``tasks.minhash``), streamed to a Parquet file in the work folder.
3. **Candidates** (DuckDB over Parquet, spills to disk): a band-hash group-by gives each bucket's best-ranked
   document; every other member becomes a candidate pair with it ("star" edges, linear in bucket size,
   unlike all pairs). New documents are also joined against the earlier index's band hashes.
4. **Verify and cluster**: texts of documents in candidate pairs are shingled again and pairs below the
   exact-Jaccard ``threshold`` are dropped (or the MinHash estimate, with ``verify: false``); connected
   components of the rest are the clusters, represented by their best-ranked member (an indexed document
   always wins: it is already published).
5. **Write** (in input order, so bytes are deterministic): kept documents with ``split_key`` (their cluster),
   a ledger row per input document (``duplicate_of``, ``similarity``, ``cluster_id``), the index of the kept
   corpus (exact hashes + band hashes) and ``report.md`` with the LSH S-curve.

Scale (measured numbers and the 100M-document plan): docs/dedup.md.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.artifacts import ArtifactStore, Manifest, StageContext
from storage.shards import LedgerWriter, ParquetShardWriter, iter_batches
from tasks.clean import CLEAN_SCHEMA
from tasks.config import DedupConfig, PipelineConfig
from tasks.executors import active_executor
from tasks.minhash import (
    NORMALIZATION_VERSION,
    MinHasher,
    MinHashParams,
    jaccard,
    s_curve_table,
)

VERSION = "3"  # 3: ledger in sorted parts with an index (storage/ledger.py)

DEDUP_SCHEMA = CLEAN_SCHEMA.append(pa.field("split_key", pa.string()))
INDEX_BANDS_SCHEMA = pa.schema([("band", pa.int16()), ("h", pa.int64()), ("doc_id", pa.string())])
INDEX_EXACT_SCHEMA = pa.schema([("doc_id", pa.string()), ("content_hash", pa.string()), ("holder", pa.int32())])
_WORK_BANDS_SCHEMA = pa.schema([("node", pa.int64()), ("band", pa.int16()), ("h", pa.int64())])

_TIEBREAK = "ordinal, file_no, row_no"
_RANK = {
    "first": _TIEBREAK,
    "longest": f"n_bytes DESC, {_TIEBREAK}",
    "source_priority": f"coalesce(list_position($priority, source), 1 << 30), {_TIEBREAK}",
}


def minhash_params(cfg: DedupConfig) -> MinHashParams:
    return MinHashParams(
        ngram=cfg.ngram, permutations=cfg.permutations, bands=cfg.bands, rows=cfg.rows, seed=cfg.minhash_seed
    )


# --- the earlier index (incremental dedup) ----------------------------------------------------------------


@dataclass(frozen=True)
class PreviousIndex:
    """The index inside an earlier dedup artifact: its kept corpus's exact and band hashes, and text holders."""

    artifact: Path

    @property
    def folder(self) -> Path:
        return self.artifact / "index"

    @property
    def exact_files(self) -> list[Path]:
        return sorted(self.folder.glob("exact-*.parquet"))

    @property
    def band_files(self) -> list[Path]:
        return sorted(self.folder.glob("bands-*.parquet"))

    def meta(self) -> dict[str, Any]:
        return json.loads((self.folder / "index.json").read_text())

    def holders(self) -> list[Path]:
        """Artifacts holding the indexed texts, by ``holder`` number ('.' is the artifact holding the index)."""
        return [(self.artifact / rel).resolve() for rel in self.meta()["holders"]]

    def check_compatible(self, params: MinHashParams) -> None:
        meta = self.meta()
        want = _index_signature(params)
        if meta["minhash"] != want:
            raise ValueError(
                f"dedup.against: the index in {self.artifact} was built with {meta['minhash']}, this run uses "
                f"{want}; band hashes are only comparable with identical settings (or drop dedup.against)"
            )


def _index_signature(params: MinHashParams) -> dict[str, Any]:
    return {
        "ngram": params.ngram,
        "permutations": params.permutations,
        "bands": params.bands,
        "rows": params.rows,
        "seed": params.seed,
        "normalization": NORMALIZATION_VERSION,
    }


def resolve_previous(against: str | None, root: str | Path) -> Manifest | None:
    """The earlier dedup artifact named by ``dedup.against``: a path, or 'latest' (newest in this root)."""
    if against is None:
        return None
    if against == "latest":
        store = ArtifactStore(root)
        found = [m for m in store.published("dedup") if _has_index(m)]
        if not found:
            return None
        latest = max(found, key=lambda m: m.created_at)
        store.materialize(latest)  # an object-store root: a verified local copy
        return latest
    try:
        _, manifest = ArtifactStore.of_artifact(against)
    except FileNotFoundError:
        manifest = None
    if manifest is None or manifest.stage != "dedup" or not _has_index(manifest):
        raise ValueError(f"dedup.against: {against} is not a dedup artifact with an index (no manifest.json/index/)")
    return manifest


def _has_index(manifest: Manifest) -> bool:
    return any(f.path == "index/index.json" for f in manifest.files)


def stage_params(cfg: PipelineConfig) -> dict[str, Any]:
    """The dedup parameters that determine its output: worker count excluded, 'latest' resolved to a hash."""
    params = cfg.dedup.model_dump(exclude={"workers", "batch_docs"})
    previous = resolve_previous(cfg.dedup.against, cfg.root)
    params["against"] = (
        None if previous is None else {"fingerprint": previous.fingerprint, "content_hash": previous.content_hash}
    )
    return params


# --- pass 1: plan with DuckDB ------------------------------------------------------------------------------


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
                      row_number() OVER (ORDER BY NOT indexed, {_RANK[cfg.keep]}) - 1 AS node
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


# --- pass 2: sign ------------------------------------------------------------------------------------------

_HASHER: MinHasher | None = None


def _init_worker(params: MinHashParams) -> None:
    global _HASHER
    _HASHER = MinHasher(params)


def _sign_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _HASHER is not None
    return _HASHER.sign(texts)


def _sign_batch_with(params: MinHashParams, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``_sign_batch`` for cluster workers, which have no pool initializer: build the hasher once per process."""
    global _HASHER
    if _HASHER is None or _HASHER.params != params:
        _HASHER = MinHasher(params)
    return _HASHER.sign(texts)


def _ordered_imap(fn: Callable, items: Iterable, workers: int, initargs: tuple) -> Iterator:
    """``map`` in order over a process pool with a bounded number of batches in flight (bounded memory).

    Inside ``tasks.executors.use_executor`` the batches run on that cluster (any size: the work is there).
    """
    executor = active_executor()
    if executor is not None:
        yield from executor.imap(functools.partial(_sign_batch_with, *initargs), items, window=64)
        return
    if workers <= 1:
        _init_worker(*initargs)
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(
        workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=initargs
    ) as ex:
        pending: list[Future] = []
        for item in items:
            pending.append(ex.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def sign(doc_paths: list[Path], p: Plan, params: MinHashParams, cfg: DedupConfig, out: Path, log) -> int:
    """Write (node, band, hash) rows for every document to sign into ``out``; returns the documents signed."""
    to_sign_pos = np.zeros(len(p.doc_id), bool)
    to_sign_pos[p.pos_of_node[p.to_sign]] = True
    total = int(to_sign_pos.sum())
    workers = cfg.workers or os.cpu_count() or 1
    if total <= 2 * cfg.batch_docs:
        workers = 1  # not worth starting processes

    def batches() -> Iterator[tuple[np.ndarray, list[str]]]:
        pos = 0
        for batch in iter_batches(doc_paths, columns=["text"], batch_size=cfg.batch_docs):
            texts = batch.column("text").to_pylist()
            where = np.flatnonzero(to_sign_pos[pos : pos + len(texts)])
            if len(where):
                yield pos + where, [texts[i] for i in where]
            pos += len(texts)

    positions: list[np.ndarray] = []

    def texts_only() -> Iterator[list[str]]:
        for pos, texts in batches():
            positions.append(pos)
            yield texts

    signed = 0
    with pq.ParquetWriter(out, _WORK_BANDS_SCHEMA, compression="zstd") as writer:
        for i, (bands, nonempty) in enumerate(_ordered_imap(_sign_batch, texts_only(), workers, (params,))):
            nodes = p.node_of_pos[positions[i]][nonempty]
            bands = bands[nonempty]
            n_bands = bands.shape[1]
            writer.write_table(
                pa.table(
                    {
                        "node": np.repeat(nodes, n_bands),
                        "band": np.tile(np.arange(n_bands, dtype=np.int16), len(nodes)),
                        "h": bands.reshape(-1),
                    },
                    schema=_WORK_BANDS_SCHEMA,
                )
            )
            signed += len(positions[i])
            positions[i] = None  # type: ignore[call-overload]
    where = f"on the {executor.name} cluster" if (executor := active_executor()) else f"with {workers} worker(s)"
    log(f"dedup: signed {signed} documents {where}")
    return signed


# --- pass 3: candidate pairs --------------------------------------------------------------------------------


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


# --- pass 4: verify and cluster ------------------------------------------------------------------------------


def _texts_by_position(doc_paths: list[Path], positions: np.ndarray, batch_rows: int) -> Iterator[tuple[int, str]]:
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


def _old_texts(con: duckdb.DuckDBPyConnection, previous: PreviousIndex, old_ids: list[str]) -> dict[str, str]:
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


# --- the stage ----------------------------------------------------------------------------------------------


def dedup(
    doc_paths: list[Path], cfg: DedupConfig, ctx: StageContext, previous: Manifest | None = None, batch_rows: int = 2048
) -> dict:
    """Write unique documents to ``docs/``, a ledger row per input document, ``index/`` and ``report.md``."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    params = minhash_params(cfg)
    index = PreviousIndex(Path(previous.path)) if previous is not None else None
    if index is not None:
        index.check_compatible(params)
    hasher = MinHasher(params)
    con = duckdb.connect()
    con.execute(f"SET temp_directory = '{ctx.work_dir / 'duckdb-spill'}'")
    p = plan(con, doc_paths, cfg, index) if doc_paths else None
    lap("plan")

    n = 0 if p is None else len(p.doc_id)
    old_ids: list[str] = []
    clusters = Clusters()
    signed = 0
    if p is not None and cfg.near and n:
        bands_file = ctx.work_dir / "bands.parquet"
        signed = sign(doc_paths, p, params, cfg, bands_file, ctx.log)
        lap("sign")
        edges = candidate_pairs(con, bands_file, params.bands)
        old_edges = np.empty((0, 2), np.int64)
        if index is not None:
            old_ids, old_edges = index_matches(con, bands_file, index, p)
        n_old = len(old_ids)
        graph = np.concatenate([edges + n_old, old_edges + np.array([0, n_old])]) if n_old else edges
        lap("candidates")
        involved_new = np.unique(graph[graph >= n_old]) - n_old if len(graph) else np.empty(0, np.int64)
        positions = np.sort(p.pos_of_node[involved_new])
        texts = {
            int(p.node_of_pos[pos]) + n_old: text for pos, text in _texts_by_position(doc_paths, positions, batch_rows)
        }
        if n_old:
            by_id = _old_texts(con, index, old_ids)  # type: ignore[arg-type]
            texts.update({i: by_id[d] for i, d in enumerate(old_ids)})
        clusters = verify_and_cluster(graph, n_old, texts, hasher, cfg)
        lap("verify_cluster")

    counts = _write(doc_paths, p, cfg, old_ids, clusters, index, ctx, batch_rows)
    lap("write")
    near = {
        "enabled": cfg.near,
        "signed": signed,
        "candidate_pairs": clusters.candidate_pairs,
        "verified_pairs": clusters.verified_pairs,
        "matched_earlier_index": counts.pop("matched_index"),
        "lsh_threshold": round(params.threshold, 4),
        "similarity_threshold": cfg.threshold,
        "s_curve": s_curve_table(params),
    }
    counts |= {"near_duplicates": near, "timings_s": timings}
    examples = counts.pop("examples")
    if examples:  # name representatives by locator too (they may be indexed documents of an earlier run)
        con.register("wanted", pa.table({"doc_id": [e["duplicate_of"] for e in examples]}))
        files = [str(f) for f in doc_paths]
        where = dict(
            con.execute(
                f"SELECT doc_id, locator FROM read_parquet({files!r}) WHERE doc_id IN (SELECT doc_id FROM wanted)"
            ).fetchall()
        )
        for e in examples:
            e["kept"] = where.get(e["duplicate_of"], e["duplicate_of"])
    con.close()
    _write_report(ctx.out_dir / "report.md", cfg, params, counts, examples)
    return counts


def _write(doc_paths, p: Plan | None, cfg, old_ids, clusters: Clusters, index, ctx, batch_rows) -> dict:
    """Stream the input once more, in order: kept documents, ledger rows and the index of the kept corpus."""
    n_old = len(old_ids)
    docs = ParquetShardWriter(ctx.out_dir / "docs", "docs", DEDUP_SCHEMA)
    ledger = LedgerWriter(ctx.out_dir / "ledger", "dedup")
    exact_index = ParquetShardWriter(ctx.out_dir / "index", "exact", INDEX_EXACT_SCHEMA, rows_per_shard=5_000_000)
    holders = ["."]
    if index is not None:
        holders = [str(Path("..") / h.name) for h in index.holders()] + ["."]
        for batch in iter_batches(index.exact_files):
            exact_index.write(batch)
    this_holder = len(holders) - 1
    reasons: Counter[str] = Counter()
    examples: list[dict] = []
    removed = np.zeros(0 if p is None else len(p.doc_id), bool)
    matched_index = 0

    def final(node: int) -> tuple[str, float, bool]:
        """(representative doc id, similarity, is an indexed doc) for a removed new node's graph position."""
        g = node + n_old
        rep = clusters.rep[g]
        return (
            (old_ids[rep], clusters.similarity[g], True)
            if rep < n_old
            else (
                str(p.doc_id[rep - n_old]),
                clusters.similarity[g],
                False,
            )
        )

    pos = 0
    for batch in iter_batches(doc_paths, batch_size=batch_rows):
        kept: list[dict] = []
        rows: list[dict] = []
        index_rows: list[dict] = []
        for doc in batch.to_pylist():
            node = int(p.node_of_pos[pos])  # type: ignore[union-attr]
            pos += 1
            base = {k: doc[k] for k in ("doc_id", "source", "locator", "content_hash")}
            verdict = _verdict(node, p, clusters, n_old, final)
            if verdict is None:
                kept.append(doc | {"split_key": doc["doc_id"]})
                rows.append(base | {"fate": "kept", "cluster_id": doc["doc_id"]})
                if not p.indexed[node]:  # type: ignore[union-attr]
                    index_rows.append(
                        {"doc_id": doc["doc_id"], "content_hash": doc["content_hash"], "holder": this_holder}
                    )
                continue
            reason, rep_id, sim, in_index = verdict
            removed[node] = True
            matched_index += in_index
            reasons[reason] += 1
            rows.append(
                base
                | {
                    "fate": "duplicate",
                    "reason": reason,
                    "duplicate_of": rep_id,
                    "similarity": sim,
                    "cluster_id": rep_id,
                }
            )
            if reason == "near_duplicate" and len(examples) < 8:
                examples.append({"removed": doc["locator"], "duplicate_of": rep_id, "similarity": sim})
        docs.write_rows(kept)
        ledger.record(rows)
        exact_index.write_rows(index_rows)
    docs.close()
    ledger.close()
    exact_index.close()
    _write_band_index(ctx, index, p, removed)
    meta = {"minhash": _index_signature(minhash_params(cfg)), "holders": holders}
    (ctx.out_dir / "index" / "index.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return {
        "docs_in": pos,
        "kept": docs.rows,
        "dropped": dict(sorted(reasons.items())),
        "matched_index": matched_index,
        "examples": examples,
    }


def _verdict(node: int, p: Plan, clusters: Clusters, n_old: int, final) -> tuple[str, str, float, bool] | None:
    """Why a document is removed: (reason, representative, similarity, representative is indexed), or None."""
    if p.indexed[node]:
        return None
    if p.old_exact[node] is not None:
        return "exact_duplicate", str(p.old_exact[node]), 1.0, True
    rep = int(p.exact_rep[node])
    if rep != node:
        if rep + n_old in clusters.rep:  # the exact representative is itself a near-duplicate
            rep_id, sim, in_index = final(rep)
            return "exact_duplicate", rep_id, sim, in_index
        return "exact_duplicate", str(p.doc_id[rep]), 1.0, bool(p.indexed[rep])
    if node + n_old in clusters.rep:
        rep_id, sim, in_index = final(node)
        return "near_duplicate", rep_id, sim, in_index
    return None


def _write_band_index(ctx: StageContext, index: PreviousIndex | None, p: Plan | None, removed: np.ndarray) -> None:
    """The kept corpus's band hashes: the earlier index's, then this run's kept documents' (input order)."""
    writer = ParquetShardWriter(ctx.out_dir / "index", "bands", INDEX_BANDS_SCHEMA, rows_per_shard=20_000_000)
    if index is not None:
        for batch in iter_batches(index.band_files):
            writer.write(batch)
    bands_file = ctx.work_dir / "bands.parquet"
    if p is not None and bands_file.exists():
        for batch in iter_batches([bands_file], batch_size=1 << 20):
            nodes = batch.column("node").to_numpy()
            keep = ~removed[nodes]
            writer.write(
                pa.table(
                    {
                        "band": batch.column("band").to_numpy()[keep],
                        "h": batch.column("h").to_numpy()[keep],
                        "doc_id": p.doc_id[nodes[keep]].tolist(),
                    },
                    schema=INDEX_BANDS_SCHEMA,
                )
            )
    writer.close()


def _write_report(path: Path, cfg: DedupConfig, params: MinHashParams, counts: dict, examples: list[dict]) -> None:
    near = counts["near_duplicates"]
    lines = [
        "# Dedup report",
        "",
        f"Documents in: {counts['docs_in']}, kept: {counts['kept']}, removed: {counts['dropped'] or 'none'}.",
        "",
        "## Near-duplicate detection (MinHash LSH)",
        "",
        f"Word {params.ngram}-gram shingles, {params.permutations} permutations, {params.bands} bands × "
        f"{params.rows} rows; the LSH threshold (1/b)^(1/r) is **{params.threshold:.3f}**; candidate pairs are "
        + ("verified with exact Jaccard" if cfg.verify else "filtered by the MinHash estimate")
        + f" ≥ {cfg.threshold}.",
        "",
        f"Signed {near['signed']} documents; {near['candidate_pairs']} candidate pairs, {near['verified_pairs']} at or "
        f"above the threshold; {near['matched_earlier_index']} duplicates matched the earlier index.",
        "",
        "| Jaccard similarity | P(candidate pair) |",
        "| ---: | ---: |",
        *[f"| {row['similarity']:.2f} | {row['candidate_probability']:.4f} |" for row in near["s_curve"]],
        "",
        "## Example near-duplicates",
        "",
        "| removed | kept representative | similarity |",
        "| --- | --- | ---: |",
        *[f"| {e['removed']} | {e['kept']} | {e['similarity']:.3f} |" for e in examples],
        "",
    ]
    path.write_text("\n".join(lines))
