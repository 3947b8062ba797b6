"""Pass 5 and the stage: write kept documents, the ledger, the index and the report, in input order."""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.artifacts import Manifest, StageContext
from storage.remote import open_input, remove_prefix
from storage.shards import LedgerWriter, ParquetShardWriter, iter_batches
from tasks.config import DedupConfig, PipelineConfig
from tasks.data.dedup.candidates import candidate_pairs, index_matches
from tasks.data.dedup.clusters import Clusters, cluster, old_texts, similarities
from tasks.data.dedup.docs import KeptRows, plan_kept_shards, write_kept_shard
from tasks.data.dedup.index import PreviousIndex, index_signature, resolve_previous
from tasks.data.dedup.plan import Plan, plan
from tasks.data.dedup.schema import INDEX_BANDS_SCHEMA, INDEX_EXACT_SCHEMA, minhash_params
from tasks.data.dedup.sign import sign
from tasks.data.minhash import (
    MinHashParams,
    s_curve_table,
)
from tasks.parts import map_parts
from tasks.stage_contract import DocCounts, StageResult

VERSION = "4"  # 4: every bucket pair can be verified (bucket_partners); duplicate_of names the linking pair


def stage_params(cfg: PipelineConfig) -> dict[str, Any]:
    """The dedup parameters that determine its output: worker count excluded, 'latest' resolved to a hash."""
    params = cfg.dedup.model_dump(exclude={"workers", "batch_docs"})
    previous = resolve_previous(cfg.dedup.against, cfg.root)
    params["against"] = (
        None if previous is None else {"fingerprint": previous.fingerprint, "content_hash": previous.content_hash}
    )
    return params


# How far through the stage each pass ends (for progress displays; signing is most of a near-dedup run).
PASS_DONE_AT = {"plan": 0.05, "sign": 0.6, "candidates": 0.7, "verify": 0.85, "cluster": 0.9, "write": 1.0}


def dedup(
    doc_paths: list[Path],
    cfg: DedupConfig,
    ctx: StageContext,
    previous: Manifest | None = None,
    batch_rows: int = 2048,
    sources: list[str] | None = None,
) -> StageResult:
    """Write unique documents to ``docs/``, a ledger row per input document, ``index/`` and ``report.md``.

    ``sources``: where the signing and verification parts read the input shards (their object URIs on a remote
    root, so workers need no shared file system; default: ``doc_paths``). On a remote root the parts' band files
    go to the attempt folder's ``.work/`` prefix, which is deleted before the artifact is committed.
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now
        ctx.progress(PASS_DONE_AT[name], f"{name} done")

    params = minhash_params(cfg)
    index = PreviousIndex(Path(previous.path)) if previous is not None else None
    if index is not None:
        index.check_compatible(params)
    con = duckdb.connect()
    con.execute(f"SET temp_directory = '{ctx.work_dir / 'duckdb-spill'}'")
    p = plan(con, doc_paths, cfg, index) if doc_paths else None
    lap("plan")

    n = 0 if p is None else len(p.doc_id)
    old_ids: list[str] = []
    clusters = Clusters()
    signed = 0
    band_files: list[Path] = []
    if p is not None and cfg.near and n:
        # Small inputs are not worth starting processes for; part layouts never depend on the worker count.
        workers = 1 if int(p.to_sign.sum()) <= 2 * cfg.batch_docs else cfg.workers
        sources = sources or [str(d) for d in doc_paths]
        work = f"{ctx.attempt_uri}/.work" if ctx.attempt_uri else str(ctx.work_dir)
        start, end = PASS_DONE_AT["plan"], PASS_DONE_AT["sign"]
        on_done = functools.partial(ctx.parts_done, start=start, share=end - start, what="sign parts")
        band_files, signed = sign(doc_paths, sources, p, params, cfg, workers, f"{work}/bands", ctx.log, on_done)
        lap("sign")
        spill = ctx.work_dir / "duckdb-spill"
        edges = candidate_pairs(band_files, params.bands, cfg.bucket_partners, workers, spill)
        old_edges = np.empty((0, 2), np.int64)
        if index is not None:
            old_ids, old_edges = index_matches(con, band_files, index, p)
        n_old = len(old_ids)
        graph = np.concatenate([edges + n_old, old_edges + np.array([0, n_old])]) if n_old else edges
        lap("candidates")
        old: dict[int, str] = {}
        if n_old:
            by_id = old_texts(con, index, old_ids)  # type: ignore[arg-type]
            old = {i: by_id[d] for i, d in enumerate(old_ids)}
        sims = similarities(graph, n_old, p.pos_of_node, sources, old, params, cfg, workers)
        lap("verify")
        clusters = cluster(graph, sims, n_old, cfg.threshold)
        lap("cluster")

    docs, matched_index, examples = _write(
        doc_paths, sources or [str(d) for d in doc_paths], p, cfg, old_ids, clusters, index, ctx, batch_rows, band_files
    )
    lap("write")
    if ctx.attempt_uri:
        remove_prefix(f"{ctx.attempt_uri}/.work")
    near = {
        "enabled": cfg.near,
        "signed": signed,
        "candidate_pairs": clusters.candidate_pairs,
        "verified_pairs": clusters.verified_pairs,
        "matched_earlier_index": matched_index,
        "lsh_threshold": round(params.threshold, 4),
        "similarity_threshold": cfg.threshold,
        "s_curve": s_curve_table(params),
    }
    result = StageResult(docs, {"near_duplicates": near, "timings_s": timings})
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
    _write_report(ctx.out_dir / "report.md", cfg, params, result.as_counts(), examples)
    return result


def _write(
    doc_paths, sources, p: Plan | None, cfg, old_ids, clusters: Clusters, index, ctx, batch_rows, band_files
) -> tuple[DocCounts, int, list[dict]]:
    """Stream the input's id columns once more, in order, into the ledger rows and the index of the kept corpus;
    the kept documents are then written by one part per output shard (``dedup.docs``), which reads the texts
    from ``sources`` (the input shards' paths or object URIs)."""
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
    decide = _Verdicts(p, clusters, old_ids) if p is not None else None

    pos = 0
    kept_batches: list[KeptRows] = []
    for batch, source, start in _id_batches(doc_paths, sources, batch_rows):
        kept: list[int] = []
        rows: list[dict] = []
        index_rows: list[dict] = []
        for row, doc in enumerate(batch.to_pylist()):
            node = int(p.node_of_pos[pos])  # type: ignore[union-attr]
            pos += 1
            base = {k: doc[k] for k in ID_COLUMNS}
            verdict = decide(node)  # type: ignore[misc]
            if verdict is None:
                kept.append(row)
                rows.append(base | {"fate": "kept", "cluster_id": doc["doc_id"]})
                if not p.indexed[node]:  # type: ignore[union-attr]
                    index_rows.append(
                        {"doc_id": doc["doc_id"], "content_hash": doc["content_hash"], "holder": this_holder}
                    )
                continue
            removed[node] = True
            matched_index += verdict.in_index
            reasons[verdict.reason] += 1
            rows.append(
                base
                | {
                    "fate": "duplicate",
                    "reason": verdict.reason,
                    "duplicate_of": verdict.duplicate_of,
                    "similarity": verdict.similarity,
                    "cluster_id": verdict.cluster_id,
                }
            )
            if verdict.reason == "near_duplicate" and len(examples) < 8:
                examples.append(
                    {"removed": doc["locator"], "duplicate_of": verdict.duplicate_of, "similarity": verdict.similarity}
                )
        kept_batches.append(KeptRows(source, start, batch.num_rows, tuple(kept)))
        ledger.record(rows)
        exact_index.write_rows(index_rows)
    ledger.close()
    exact_index.close()
    (ctx.out_dir / "docs").mkdir(parents=True, exist_ok=True)
    shards = plan_kept_shards(kept_batches, ctx.attempt_uri or str(ctx.out_dir))
    for entries in map_parts(write_kept_shard, shards, cfg.workers if len(shards) > 1 else 1):
        ctx.uploaded.extend(entries)
    _write_band_index(ctx, index, p, removed, band_files)
    meta = {"minhash": index_signature(minhash_params(cfg)), "holders": holders}
    (ctx.out_dir / "index" / "index.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return DocCounts(pos, sum(len(b.kept) for b in kept_batches), reasons), matched_index, examples


ID_COLUMNS = ("doc_id", "source", "locator", "content_hash")


def _id_batches(doc_paths, sources, batch_rows: int):
    """The input's id columns in batches of ``batch_rows`` (per file, as the docs were read before), with the
    file each batch is in (where parts read it) and the batch's first row in that file."""
    for path, source in zip(doc_paths, sources, strict=True):
        start = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=list(ID_COLUMNS)):
            yield batch, source, start
            start += batch.num_rows


@dataclass(frozen=True)
class Verdict:
    """Why a document is removed: the document it duplicates (the verified pair that linked it, or its exact
    copy), their similarity, the kept (or indexed) representative of its cluster, and whether that is indexed."""

    reason: str
    duplicate_of: str
    similarity: float
    cluster_id: str
    in_index: bool


class _Verdicts:
    """Each removed document's verdict, from the plan's exact groups and the near-duplicate clusters."""

    def __init__(self, p: Plan, clusters: Clusters, old_ids: list[str]) -> None:
        self.p, self.clusters, self.old_ids, self.n_old = p, clusters, old_ids, len(old_ids)

    def _doc(self, g: int) -> str:
        return self.old_ids[g] if g < self.n_old else str(self.p.doc_id[g - self.n_old])

    def _cluster(self, node: int) -> tuple[str, bool]:
        """The representative of a node's near-duplicate cluster (itself when in none) and if it is indexed."""
        rep = self.clusters.rep.get(node + self.n_old, node + self.n_old)
        return self._doc(rep), rep < self.n_old or bool(self.p.indexed[rep - self.n_old])

    def __call__(self, node: int) -> Verdict | None:
        p, g = self.p, node + self.n_old
        if p.indexed[node]:
            return None
        if p.old_exact[node] is not None:
            old = str(p.old_exact[node])
            return Verdict("exact_duplicate", old, 1.0, old, True)
        rep = int(p.exact_rep[node])
        if rep != node:
            cluster_id, in_index = self._cluster(rep)
            return Verdict("exact_duplicate", str(p.doc_id[rep]), 1.0, cluster_id, in_index)
        if g in self.clusters.link:
            cluster_id, in_index = self._cluster(node)
            link = self.clusters.link[g]
            return Verdict("near_duplicate", self._doc(link), self.clusters.similarity[g], cluster_id, in_index)
        return None


def _write_band_index(
    ctx: StageContext, index: PreviousIndex | None, p: Plan | None, removed: np.ndarray, band_files: list[str]
) -> None:
    """The kept corpus's band hashes: the earlier index's, then this run's kept documents' (input order)."""
    writer = ParquetShardWriter(ctx.out_dir / "index", "bands", INDEX_BANDS_SCHEMA, rows_per_shard=20_000_000)
    if index is not None:
        for batch in iter_batches(index.band_files):
            writer.write(batch)
    if p is not None:
        for batch in (b for f in band_files for b in pq.ParquetFile(open_input(f)).iter_batches(1 << 20)):
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
