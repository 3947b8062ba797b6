"""Tokenize: encode kept documents into flat token shards per split, recording each document's token span.

Format: one uncompressed Arrow IPC file per shard (``tokens/<split>-00000.arrow``) holding a single flat
uint16/uint32 column: memory-mappable with zero copies, and block size stays a training-time choice
(windows of ``block_size + 1`` tokens are cut by the loader), so changing the context length does not
re-tokenize. Documents are separated by one end-of-text token. Splits are chosen by a hash of the doc id,
so a document never changes split when others are added.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from storage.artifacts import StageContext
from storage.hashing import unit_interval
from storage.shards import LedgerWriter, iter_batches, token_dtype, write_token_shard
from tasks.config import TokenizeConfig, TokenizerConfig
from tasks.data.tokenizer import load_tokenizer
from tasks.stage_contract import DocCounts, StageResult

VERSION = "2"  # 2: ledger in sorted parts with an index (storage/ledger.py)
SPLITS = ("train", "val", "test")


def split_of(doc_id: str, cfg: TokenizeConfig) -> str:
    u = unit_interval(doc_id, "split")
    if u < cfg.val_fraction:
        return "val"
    if u < cfg.val_fraction + cfg.test_fraction:
        return "test"
    return "train"


class _SplitShards:
    """Accumulates one split's tokens and flushes a shard file at document boundaries."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict] = []
        self.tokens = self.docs = self.bytes = 0

    @property
    def current_shard(self) -> str:
        return f"{self.split}-{len(self.shards):05d}"

    def add(self, ids: list[int], n_bytes: int) -> tuple[str, int, int]:
        start = self.pending_tokens
        self.pending.append(np.asarray(ids, dtype=self.dtype))
        self.pending_tokens += len(ids)
        self.tokens += len(ids)
        self.docs += 1
        self.bytes += n_bytes
        span = (self.current_shard, start, self.pending_tokens)
        if self.pending_tokens >= self.shard_tokens:
            self.flush()
        return span

    def flush(self) -> None:
        if not self.pending:
            return
        name = self.current_shard
        write_token_shard(self.folder / f"{name}.arrow", np.concatenate(self.pending))
        self.shards.append({"shard": name, "tokens": self.pending_tokens})
        self.pending, self.pending_tokens = [], 0


def tokenize(
    doc_paths: list[Path], tokenizer_dir: Path, tok_cfg: TokenizerConfig, cfg: TokenizeConfig, ctx: StageContext
) -> StageResult:
    """Encode documents in batches (the library's own thread pool) and write token shards plus a ledger."""
    tokenizer = load_tokenizer(tokenizer_dir)
    eot = tokenizer.token_to_id(tok_cfg.special_tokens[0])
    # encode_batch_fast skips computing character offsets, which tokenize never uses (tokenizers >= 0.20).
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    dtype = token_dtype(tokenizer.get_vocab_size())
    folder = ctx.out_dir / "tokens"
    folder.mkdir(parents=True)
    splits = {name: _SplitShards(folder, name, dtype, cfg.shard_tokens) for name in SPLITS}
    ledger = LedgerWriter(ctx.out_dir / "ledger", "tokenize")
    per_source_tokens: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(SPLITS, 0))
    # Dedup gives each document a split key (its near-duplicate cluster), so a cluster never straddles splits.
    columns = ["doc_id", "source", "text", "n_bytes"]
    if doc_paths and "split_key" in pq.ParquetFile(doc_paths[0]).schema_arrow.names:
        columns.append("split_key")
    for batch in iter_batches(doc_paths, columns=columns, batch_size=cfg.batch_docs):
        docs = batch.to_pylist()
        encodings = encode([d["text"] for d in docs], add_special_tokens=False)
        rows = []
        for doc, enc in zip(docs, encodings, strict=True):
            split = split_of(doc.get("split_key") or doc["doc_id"], cfg)
            shard, start, end = splits[split].add([*enc.ids, eot], doc["n_bytes"])
            per_source_tokens[doc["source"]][split] += end - start
            rows.append(
                {
                    "doc_id": doc["doc_id"],
                    "source": doc["source"],
                    "fate": "kept",
                    "split": split,
                    "shard": shard,
                    "token_start": start,
                    "token_end": end,
                }
            )
        ledger.record(rows)
    for shards in splits.values():
        shards.flush()
    ledger.close()
    summary = {
        name: {
            "docs": s.docs,
            "tokens": s.tokens,
            "bytes": s.bytes,
            "bytes_per_token": round(s.bytes / s.tokens, 4) if s.tokens else None,
            "shards": s.shards,
        }
        for name, s in splits.items()
    }
    docs_in = sum(s.docs for s in splits.values())
    extra = {
        "tokens": sum(s.tokens for s in splits.values()),
        "dtype": dtype.name,
        "eot_id": eot,
        "vocab_size": tokenizer.get_vocab_size(),
        "splits": summary,
        "tokens_per_source": {k: dict(v) for k, v in sorted(per_source_tokens.items())},
    }
    return StageResult(DocCounts(docs_in, docs_in), extra)
