"""The dedup artifact's tables, the ranking policies and the MinHash parameters a config selects."""

from __future__ import annotations

import pyarrow as pa

from tasks.config import DedupConfig
from tasks.data.clean import CLEAN_SCHEMA
from tasks.data.minhash import (
    MinHashParams,
)

DEDUP_SCHEMA = CLEAN_SCHEMA.append(pa.field("split_key", pa.string()))
INDEX_BANDS_SCHEMA = pa.schema([("band", pa.int16()), ("h", pa.int64()), ("doc_id", pa.string())])
INDEX_EXACT_SCHEMA = pa.schema([("doc_id", pa.string()), ("content_hash", pa.string()), ("holder", pa.int32())])
WORK_BANDS_SCHEMA = pa.schema([("node", pa.int64()), ("band", pa.int16()), ("h", pa.int64())])

TIEBREAK = "ordinal, file_no, row_no"
RANK = {
    "first": TIEBREAK,
    "longest": f"n_bytes DESC, {TIEBREAK}",
    "source_priority": f"coalesce(list_position($priority, source), 1 << 30), {TIEBREAK}",
}


def minhash_params(cfg: DedupConfig) -> MinHashParams:
    return MinHashParams(
        ngram=cfg.ngram,
        permutations=cfg.permutations,
        bands=cfg.bands,
        rows=cfg.rows,
        seed=cfg.minhash_seed,
        fold_numbers=cfg.fold_numbers,
    )
