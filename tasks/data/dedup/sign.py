"""Pass 2, sign: MinHash band hashes of the documents left after exact dedup, fanned out over workers."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
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
from tasks.parts import active_executor, imap_parts

_HASHER: MinHasher | None = None


def _sign_batch_with(params: MinHashParams, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Sign one batch; the hasher is built once per worker process (its tables are large)."""
    global _HASHER
    if _HASHER is None or _HASHER.params != params:
        _HASHER = MinHasher(params)
    return _HASHER.sign(texts)


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
    with pq.ParquetWriter(out, WORK_BANDS_SCHEMA, compression="zstd") as writer:
        signed_batches = imap_parts(functools.partial(_sign_batch_with, params), texts_only(), workers)
        for i, (bands, nonempty) in enumerate(signed_batches):
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
                    schema=WORK_BANDS_SCHEMA,
                )
            )
            signed += len(positions[i])
            positions[i] = None  # type: ignore[call-overload]
    where = f"on the {executor.name} cluster" if (executor := active_executor()) else f"with {workers} worker(s)"
    log(f"dedup: signed {signed} documents {where}")
    return signed
