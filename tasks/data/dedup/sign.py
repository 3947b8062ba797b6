"""Pass 2, sign: MinHash band hashes of the documents left after exact dedup, one part per input shard.

Each part reads its own shard's texts (nothing but the shard's path and the node numbers of its rows travels
to the worker) and writes ``bands-<part>.parquet``; the files, read in part order, list the signed documents in
input order, whatever the executor or worker count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.shards import iter_batches
from tasks.config import DedupConfig
from tasks.data.dedup.plan import Plan
from tasks.data.dedup.schema import WORK_BANDS_SCHEMA
from tasks.data.minhash import (
    MinHasher,
    MinHashParams,
)
from tasks.parts import active_executor, default_workers, map_parts

_HASHER: MinHasher | None = None


def _hasher(params: MinHashParams) -> MinHasher:
    """The hasher, built once per worker process (its tables are large and its word cache warms up)."""
    global _HASHER
    if _HASHER is None or _HASHER.params != params:
        _HASHER = MinHasher(params)
    return _HASHER


@dataclass(frozen=True)
class SignPart:
    """One input shard: its path, the node of each of its rows (-1: not signed) and where to write."""

    doc_path: str
    nodes: np.ndarray
    params: MinHashParams
    batch_docs: int
    out: str


def sign_part(part: SignPart) -> int:
    """Write (node, band, hash) rows for the part's documents to sign; returns how many it signed."""
    hasher = _hasher(part.params)
    signed = 0
    pos = 0
    with pq.ParquetWriter(part.out, WORK_BANDS_SCHEMA, compression="zstd") as writer:
        for batch in iter_batches([Path(part.doc_path)], columns=["text"], batch_size=part.batch_docs):
            nodes = part.nodes[pos : pos + batch.num_rows]
            pos += batch.num_rows
            where = np.flatnonzero(nodes >= 0)
            if not len(where):
                continue
            texts = batch.column("text").take(pa.array(where)).to_pylist()
            bands, nonempty = hasher.sign(texts)
            signed += len(where)
            nodes, bands = nodes[where][nonempty], bands[nonempty]
            n_bands = bands.shape[1]
            writer.write_table(
                pa.table(
                    {
                        "node": np.repeat(nodes, n_bands),
                        "band": np.tile(np.arange(n_bands, dtype=np.int16), len(nodes)),
                        "h": bands.reshape(-1),
                    },
                    schema=WORK_BANDS_SCHEMA,
                )
            )
    return signed


def sign(
    doc_paths: list[Path], p: Plan, params: MinHashParams, cfg: DedupConfig, workers: int | None, out: Path, log
) -> tuple[list[Path], int]:
    """Sign every document to sign, one part per input shard: (the band files in input order, documents signed)."""
    node_of_row = np.where(_sign_mask(p), p.node_of_pos, -1)
    out.mkdir(parents=True, exist_ok=True)
    parts, start = [], 0
    for i, path in enumerate(doc_paths):
        rows = pq.ParquetFile(path).metadata.num_rows
        nodes = node_of_row[start : start + rows]
        parts.append(SignPart(str(path), nodes, params, cfg.batch_docs, str(out / f"bands-{i:05d}.parquet")))
        start += rows
    signed = sum(map_parts(sign_part, parts, workers))
    executor = active_executor()
    n_workers = min(default_workers(workers), len(parts))
    where = f"on the {executor.name} cluster" if executor else f"with {n_workers} worker(s)"
    log(f"dedup: signed {signed} documents in {len(parts)} parts {where}")
    return [Path(part.out) for part in parts], signed


def _sign_mask(p: Plan) -> np.ndarray:
    """By input position: whether the document is signed (not indexed, not an exact copy)."""
    mask = np.zeros(len(p.doc_id), bool)
    mask[p.pos_of_node[p.to_sign]] = True
    return mask
