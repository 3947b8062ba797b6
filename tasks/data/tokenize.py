"""Tokenize: encode kept documents into flat token shards per split, recording each document's token span.

Format: one uncompressed Arrow IPC file per shard (``tokens/<split>-00000.arrow``) holding a single flat
uint16/uint32 column: memory-mappable with zero copies, and block size stays a training-time choice
(windows of ``block_size + 1`` tokens are cut by the loader), so changing the context length does not
re-tokenize. Documents are separated by one end-of-text token. Splits are chosen by a hash of the doc id,
so a document never changes split when others are added.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.artifacts import StageContext
from storage.hashing import unit_interval
from storage.shards import LedgerWriter, iter_batches, token_dtype, write_token_shard
from tasks.config import DecontaminateConfig, TokenizeConfig, TokenizerConfig
from tasks.data.decontaminate import Match, NgramIndex, check_batch, set_index
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


def _own_split_indexes(doc_paths: list[Path], columns: list[str], cfg: TokenizeConfig, n: int) -> list[NgramIndex]:
    """N-gram indexes of this run's val and test documents (one pass over the documents)."""

    def batches(split: str):
        for batch in iter_batches(doc_paths, columns=columns, batch_size=cfg.batch_docs):
            keys = batch.column("split_key" if "split_key" in columns else "doc_id").to_pylist()
            ids = batch.column("doc_id").to_pylist()
            picked = [
                i
                for i, (key, doc_id) in enumerate(zip(keys, ids, strict=True))
                if split_of(key or doc_id, cfg) == split
            ]
            if picked:
                texts = batch.column("text").to_pylist()
                yield [texts[i] for i in picked], [ids[i] for i in picked]

    return [NgramIndex.build(split, batches(split), n) for split in ("val", "test")]


class _Contamination:
    """Checks train-bound documents against the evaluation sets and collects the matches."""

    def __init__(self, cfg: DecontaminateConfig, indexes: list[NgramIndex]):
        self.cfg, self.indexes = cfg, indexes
        self.rows: list[dict] = []

    def check(self, docs: list[dict]) -> list[Match | None]:
        """The decisive match (first set in order) of each document, None when clean."""
        found = check_batch(
            [d["doc_id"] for d in docs], [d["source"] for d in docs], [d["text"] for d in docs],
            self.indexes, self.cfg.ngram, self.cfg.min_overlap,
        )  # fmt: skip
        for matches in found:
            for m in matches:
                self.rows += [
                    {"doc_id": m.doc_id, "source": m.source, "set": m.set, "item_id": item, "overlap": share,
                     "action": self.cfg.action}
                    for item, share in m.items
                ]  # fmt: skip
        return [matches[0] if matches else None for matches in found]

    def write(self, folder: Path) -> dict:
        folder.mkdir(parents=True)
        table = pa.Table.from_pylist(self.rows, schema=MATCH_SCHEMA).sort_by(
            [("doc_id", "ascending"), ("set", "ascending")]
        )
        pq.write_table(table, folder / "matches.parquet", compression="zstd")
        summary = {}
        for index in self.indexes:
            mine = [r for r in self.rows if r["set"] == index.name]
            summary[index.name] = {
                "items": len(index.item_ids),
                "items_without_ngrams": index.skipped,
                "items_matched": len({r["item_id"] for r in mine}),
                "docs_matched": len({r["doc_id"] for r in mine}),
            }
        return {
            "action": self.cfg.action,
            "ngram": self.cfg.ngram,
            "min_overlap": self.cfg.min_overlap,
            "sets": summary,
        }


MATCH_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("source", pa.string()), ("set", pa.string()), ("item_id", pa.string()),
     ("overlap", pa.float64()), ("action", pa.string())]
)  # fmt: skip


def tokenize(
    doc_paths: list[Path],
    tokenizer_dir: Path,
    tok_cfg: TokenizerConfig,
    cfg: TokenizeConfig,
    ctx: StageContext,
    decontaminate: DecontaminateConfig | None = None,
    cache_dir: Path | None = None,
) -> StageResult:
    """Encode documents in batches (the library's own thread pool) and write token shards plus a ledger.

    With ``decontaminate`` enabled, every train-bound document is first checked for n-gram overlap with this
    run's val/test documents and the named evaluation sets; a contaminated one is dropped (or flagged) with
    reason ``contaminated:<set>`` and its matches go to ``contamination/matches.parquet``.
    """
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
    contamination = None
    if decontaminate is not None and decontaminate.enabled:
        indexes = _own_split_indexes(doc_paths, columns, cfg, decontaminate.ngram) if decontaminate.own_splits else []
        indexes += [set_index(s, decontaminate.ngram, cache_dir) for s in decontaminate.sets]
        contamination = _Contamination(decontaminate, indexes)
    dropped: Counter[str] = Counter()
    for batch in iter_batches(doc_paths, columns=columns, batch_size=cfg.batch_docs):
        docs = batch.to_pylist()
        split_names = [split_of(d.get("split_key") or d["doc_id"], cfg) for d in docs]
        found: list[Match | None] = [None] * len(docs)
        if contamination is not None:
            train = [i for i, split in enumerate(split_names) if split == "train"]
            for i, match in zip(train, contamination.check([docs[i] for i in train]), strict=True):
                found[i] = match
        drop = [m is not None and decontaminate.action == "drop" for m in found]
        encoded = iter(
            encode([d["text"] for d, gone in zip(docs, drop, strict=True) if not gone], add_special_tokens=False)
        )
        rows = []
        for doc, split, match, gone in zip(docs, split_names, found, drop, strict=True):
            row = {"doc_id": doc["doc_id"], "source": doc["source"], "fate": "kept", "split": split}
            if match is not None:
                row |= {"reason": f"contaminated:{match.set}", "score": match.overlap}
            if gone:
                dropped[row["reason"]] += 1
                rows.append(row | {"fate": "dropped"})
                continue
            shard, start, end = splits[split].add([*next(encoded).ids, eot], doc["n_bytes"])
            per_source_tokens[doc["source"]][split] += end - start
            rows.append(row | {"shard": shard, "token_start": start, "token_end": end})
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
    kept = sum(s.docs for s in splits.values())
    extra = {"contamination": contamination.write(ctx.out_dir / "contamination")} if contamination else {}
    extra |= {
        "tokens": sum(s.tokens for s in splits.values()),
        "dtype": dtype.name,
        "eot_id": eot,
        "vocab_size": tokenizer.get_vocab_size(),
        "splits": summary,
        "tokens_per_source": {k: dict(v) for k, v in sorted(per_source_tokens.items())},
    }
    return StageResult(DocCounts(kept + sum(dropped.values()), kept, dropped), extra)
