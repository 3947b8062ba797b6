"""Pass 2, sign: MinHash band hashes of the documents left after exact dedup, one part per input shard.

Each part reads its own shard's texts (nothing but the shard's path and the node numbers of its rows travels
to the worker) and writes ``bands-<part>.parquet``; the files, read in part order, list the signed documents in
input order, whatever the executor or worker count.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.remote import is_remote, open_input, put_files
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
    """One input shard: its path or URI, the node of each of its rows (-1: not signed) and where to write (a
    path, or an object URI: then the part writes a scratch file of its own and uploads it)."""

    doc_path: str
    nodes: np.ndarray
    params: MinHashParams
    batch_docs: int
    out: str


def sign_part(part: SignPart) -> int:
    """Write (node, band, hash) rows for the part's documents to sign; returns how many it signed."""
    if not is_remote(part.out):
        return _sign_into(part, Path(part.out))
    with tempfile.TemporaryDirectory(prefix="sign-part-") as scratch:
        name = part.out.rsplit("/", 1)[1]
        signed = _sign_into(part, Path(scratch) / name)
        put_files(Path(scratch), part.out.rsplit("/", 1)[0], [name])
    return signed


def _sign_into(part: SignPart, out: Path) -> int:
    hasher = _hasher(part.params)
    signed = 0
    pos = 0
    source = pq.ParquetFile(open_input(part.doc_path))
    with pq.ParquetWriter(out, WORK_BANDS_SCHEMA, compression="zstd") as writer:
        for batch in source.iter_batches(columns=["text"], batch_size=part.batch_docs):
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
    doc_paths: list[Path],
    sources: list[str],
    p: Plan,
    params: MinHashParams,
    cfg: DedupConfig,
    workers: int | None,
    out: str,
    log,
    on_done: Callable[[int, int], None] | None = None,
) -> tuple[list[str], int]:
    """Sign every document to sign, one part per input shard (read from ``sources``, the shards' paths or URIs):
    (the band files in input order, documents signed). ``out``: a folder, or an object-store prefix."""
    node_of_row = np.where(_sign_mask(p), p.node_of_pos, -1)
    if not is_remote(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    parts, start = [], 0
    for i, (path, source) in enumerate(zip(doc_paths, sources, strict=True)):
        rows = pq.ParquetFile(path).metadata.num_rows
        nodes = node_of_row[start : start + rows]
        parts.append(SignPart(source, nodes, params, cfg.batch_docs, f"{out}/bands-{i:05d}.parquet"))
        start += rows
    signed = sum(map_parts(sign_part, parts, workers, on_done))
    executor = active_executor()
    n_workers = min(default_workers(workers), len(parts))
    where = f"on the {executor.name} cluster" if executor else f"with {n_workers} worker(s)"
    log(f"dedup: signed {signed} documents in {len(parts)} parts {where}")
    return [part.out for part in parts], signed


def _sign_mask(p: Plan) -> np.ndarray:
    """By input position: whether the document is signed (not indexed, not an exact copy)."""
    mask = np.zeros(len(p.doc_id), bool)
    mask[p.pos_of_node[p.to_sign]] = True
    return mask
