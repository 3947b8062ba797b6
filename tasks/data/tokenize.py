"""Tokenize: encode kept documents into flat token shards per split, recording each document's token span.

Fan-out: one part per dedup output shard encodes it and writes its own token shards and document spans; the
flow process then names the shards globally in part order (``train-00000``, ...) and writes the ledger, so
the artifact is byte-identical for any number of workers and any executor.

Format: one uncompressed Arrow IPC file per shard (``tokens/<split>-00000.arrow``) holding a single flat
uint16/uint32 column: memory-mappable with zero copies, and block size stays a training-time choice
(windows of ``block_size + 1`` tokens are cut by the loader), so changing the context length does not
re-tokenize. Documents are separated by one end-of-text token. Splits are chosen by a hash of the doc id,
so a document never changes split when others are added.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from storage.artifacts import FileEntry, StageContext
from storage.hashing import file_sha256, unit_interval
from storage.part_outputs import part_folder
from storage.remote import copy_object, is_remote, open_input, put_files, remove_prefix
from storage.shards import LedgerWriter, ParquetShardWriter, token_dtype, write_token_shard
from tasks.config import DecontaminateConfig, TokenizeConfig, TokenizerConfig
from tasks.data.decontaminate import Match, NgramIndex, check_batch, set_index
from tasks.data.tokenizer import load_tokenizer
from tasks.parts import map_parts
from tasks.stage_contract import DocCounts, StageResult

VERSION = "3"  # 3: one part per dedup shard; shards end at part boundaries (identical bytes for one input shard)
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

    def add(self, ids: list[int], n_bytes: int) -> tuple[int, int, int]:
        """Append a document; returns (shard number, token start, token end) of its span."""
        start = self.pending_tokens
        self.pending.append(np.asarray(ids, dtype=self.dtype))
        self.pending_tokens += len(ids)
        self.tokens += len(ids)
        self.docs += 1
        self.bytes += n_bytes
        span = (len(self.shards), start, self.pending_tokens)
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


OWN_SPLITS = ("val", "test")


@dataclass(frozen=True)
class OwnSplitPart:
    """One dedup shard whose val and test documents to index (``<out>/val.npz``, ``<out>/test.npz``; ``out`` a
    folder, or a prefix under the attempt's ``.parts/`` that the part uploads into)."""

    doc_path: str
    columns: tuple[str, ...]
    cfg: TokenizeConfig
    n: int
    out: str


def own_split_part(part: OwnSplitPart) -> list[str]:
    """Index the val and test documents of one shard (one read of it); return where each split's index is."""
    picked: dict[str, list[tuple[list[str], list[str]]]] = {split: [] for split in OWN_SPLITS}
    key = "split_key" if "split_key" in part.columns else "doc_id"
    source = pq.ParquetFile(open_input(part.doc_path))
    for batch in source.iter_batches(columns=list(part.columns), batch_size=part.cfg.batch_docs):
        ids, texts = batch.column("doc_id").to_pylist(), batch.column("text").to_pylist()
        splits = [split_of(k or d, part.cfg) for k, d in zip(batch.column(key).to_pylist(), ids, strict=True)]
        for split in OWN_SPLITS:
            rows = [i for i, s in enumerate(splits) if s == split]
            if rows:
                picked[split].append(([texts[i] for i in rows], [ids[i] for i in rows]))
    with part_folder(part.out, "own-split-part-") as folder:
        for split in OWN_SPLITS:
            NgramIndex.build(split, picked[split], part.n).save(folder / f"{split}.npz")
        if is_remote(part.out):
            put_files(folder, part.out, [f"{split}.npz" for split in OWN_SPLITS])
    return [f"{part.out}/{split}.npz" for split in OWN_SPLITS]


def _own_split_indexes(
    doc_paths: list[str], columns: list[str], cfg: TokenizeConfig, n: int, workers: int | None, where: str
) -> list[NgramIndex]:
    """N-gram indexes of this run's val and test documents: one part per shard indexes its own documents, and
    the partial indexes are combined in part order (the same index one pass over every shard would build)."""
    parts = [
        OwnSplitPart(path, tuple(columns), cfg, n, f"{where}/own-splits/part-{i:05d}")
        for i, path in enumerate(doc_paths)
    ]
    found = map_parts(own_split_part, parts, workers)
    return [
        NgramIndex.combine(split, [NgramIndex.load(split, open_input(locations[k])) for locations in found])
        for k, split in enumerate(OWN_SPLITS)
    ]


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


_TOKENIZERS: dict[str, object] = {}


def _tokenizer(location: str):
    """The tokenizer of a folder or of an object URI of ``tokenizer.json``, loaded once per worker process."""
    if location not in _TOKENIZERS:
        _TOKENIZERS.clear()
        if is_remote(location):
            with open_input(location) as fh:
                _TOKENIZERS[location] = Tokenizer.from_str(fh.read().decode())
        else:
            _TOKENIZERS[location] = load_tokenizer(Path(location))
    return _TOKENIZERS[location]


@dataclass(frozen=True)
class TokenizePart:
    """One dedup output shard to encode into ``out`` (a folder of its own): token shards named ``<split>-<k>``
    in the part's own numbering, and ``spans.parquet`` (each document's split, part-local shard and span).

    On a remote root every location is an object URI: the part reads its shard and the tokenizer from the store
    and uploads what it wrote from a scratch folder of its own, so a worker needs nothing but the store.
    """

    doc_path: str
    tokenizer: str  # the tokenizer artifact's folder, or the URI of its tokenizer.json
    eot: str
    cfg: TokenizeConfig
    out: str
    decontaminate: DecontaminateConfig | None = None
    indexes: tuple[tuple[str, str], ...] = ()  # (set name, saved NgramIndex: path or URI) to check train docs


SPANS_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("fate", pa.string()),
        ("reason", pa.string()),
        ("score", pa.float64()),
        ("shard_in_part", pa.int32()),
        ("token_start", pa.int64()),
        ("token_end", pa.int64()),
    ]
)


def tokenize_part(part: TokenizePart) -> dict:
    """Encode one shard (the library's own thread pool per batch); returns its per-split counts and shards."""
    if not is_remote(part.out):
        shutil.rmtree(part.out, ignore_errors=True)  # a retried part starts over
        return _encode_part(part, Path(part.out))
    with tempfile.TemporaryDirectory(prefix="tokenize-part-") as scratch:
        result = _encode_part(part, Path(scratch) / "out")
        folder = Path(scratch) / "out"
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        for split in result["splits"].values():
            for shard in split["shards"]:
                path = folder / f"{shard['shard']}.arrow"
                shard |= {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        put_files(folder, part.out, names)
    result["spans"] = [f"{part.out}/{Path(p).name}" for p in result["spans"]]
    return result


def _encode_part(part: TokenizePart, folder: Path) -> dict:
    tokenizer = _tokenizer(part.tokenizer)
    eot = tokenizer.token_to_id(part.eot)
    # encode_batch_fast skips computing character offsets, which tokenize never uses (tokenizers >= 0.20).
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    folder.mkdir(parents=True)
    dtype = token_dtype(tokenizer.get_vocab_size())
    splits = {name: _SplitShards(folder, name, dtype, part.cfg.shard_tokens) for name in SPLITS}
    per_source_tokens: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(SPLITS, 0))
    # Dedup gives each document a split key (its near-duplicate cluster), so a cluster never straddles splits.
    columns = ["doc_id", "source", "text", "n_bytes"]
    source = pq.ParquetFile(open_input(part.doc_path))
    if "split_key" in source.schema_arrow.names:
        columns.append("split_key")
    contamination = None
    if part.decontaminate is not None and part.indexes:
        contamination = _Contamination(part.decontaminate, [_index(name, where) for name, where in part.indexes])
    dropped: Counter[str] = Counter()
    with ParquetShardWriter(folder, "spans", SPANS_SCHEMA, rows_per_shard=1 << 40) as spans:
        for batch in source.iter_batches(columns=columns, batch_size=part.cfg.batch_docs):
            docs = batch.to_pylist()
            split_names = [split_of(d.get("split_key") or d["doc_id"], part.cfg) for d in docs]
            found: list[Match | None] = [None] * len(docs)
            if contamination is not None:
                train = [i for i, split in enumerate(split_names) if split == "train"]
                for i, match in zip(train, contamination.check([docs[i] for i in train]), strict=True):
                    found[i] = match
            drop = [m is not None and part.decontaminate.action == "drop" for m in found]  # type: ignore[union-attr]
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
                rows.append(row | {"shard_in_part": shard, "token_start": start, "token_end": end})
            spans.write_rows(rows)
    for shards in splits.values():
        shards.flush()
    return {
        "dropped": dict(dropped),
        "matches": contamination.rows if contamination is not None else [],
        "splits": {
            name: {"docs": s.docs, "tokens": s.tokens, "bytes": s.bytes, "shards": s.shards}
            for name, s in splits.items()
        },
        "tokens_per_source": {k: dict(v) for k, v in per_source_tokens.items()},
        "spans": [str(p) for p in spans.paths],
    }


def tokenize(
    doc_paths: list[str] | list[Path],
    tokenizer_dir: Path,
    tok_cfg: TokenizerConfig,
    cfg: TokenizeConfig,
    ctx: StageContext,
    workers: int | None = None,
    tokenizer_uri: str | None = None,
    decontaminate: DecontaminateConfig | None = None,
    cache_dir: Path | None = None,
) -> StageResult:
    """Encode the dedup output, one part per shard, then name the parts' token shards globally in part order.

    Shards never straddle parts, so a part's output depends on its own shard alone and the artifact is the same
    for any worker count or executor; the flow process only renames files (on a remote root: server-side copies
    inside the attempt folder) and writes the ledger. ``tokenizer_uri``: where remote parts read the tokenizer.

    With ``decontaminate`` enabled, every train-bound document is first checked for n-gram overlap with this
    run's val/test documents and the named evaluation sets; a contaminated one is dropped (or flagged) with
    reason ``contaminated:<set>`` and its matches go to ``contamination/matches.parquet``. The own splits' n-gram
    indexes are built by one part per shard (``own_split_part``) and combined here; every index is saved where
    the tokenize parts load it (once per worker process).
    """
    remote = ctx.attempt_uri is not None
    parts_dir = f"{ctx.attempt_uri}/.parts" if remote else str(ctx.work_dir / "parts")
    tokenizer = tokenizer_uri if remote and tokenizer_uri else str(tokenizer_dir)
    contamination, saved = None, ()
    if decontaminate is not None and decontaminate.enabled:
        columns = ["doc_id", "text"] + (["split_key"] if _has_split_key(doc_paths) else [])
        own = decontaminate.own_splits
        paths = [str(p) for p in doc_paths]
        indexes = _own_split_indexes(paths, columns, cfg, decontaminate.ngram, workers, parts_dir) if own else []
        indexes += [set_index(s, decontaminate.ngram, cache_dir) for s in decontaminate.sets]
        contamination = _Contamination(decontaminate, indexes)
        saved = tuple((index.name, _save_index(index, i, ctx, parts_dir)) for i, index in enumerate(indexes))
    parts = [
        TokenizePart(
            str(path), tokenizer, tok_cfg.special_tokens[0], cfg, f"{parts_dir}/part-{i:05d}", decontaminate, saved
        )
        for i, path in enumerate(doc_paths)
    ]
    results = map_parts(tokenize_part, parts, workers, ctx.parts_done)
    folder = ctx.out_dir / "tokens"
    folder.mkdir(parents=True)
    ledger = LedgerWriter(ctx.out_dir / "ledger", "tokenize")
    splits = {name: {"docs": 0, "tokens": 0, "bytes": 0, "shards": []} for name in SPLITS}
    per_source_tokens: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(SPLITS, 0))
    dropped: Counter[str] = Counter()
    for part, result in zip(parts, results, strict=True):
        global_name: dict[tuple[str, int], str] = {}
        for name, counts in result["splits"].items():
            total = splits[name]
            for k, shard in enumerate(counts["shards"]):
                global_name[name, k] = f"{name}-{len(total['shards']):05d}"
                src, dst = f"{part.out}/{shard['shard']}.arrow", f"tokens/{global_name[name, k]}.arrow"
                if remote:
                    copy_object(src, f"{ctx.attempt_uri}/{dst}")
                    ctx.uploaded.append(FileEntry(path=dst, bytes=shard["bytes"], sha256=shard["sha256"]))
                else:
                    os.replace(src, ctx.out_dir / dst)
                total["shards"].append({"shard": global_name[name, k], "tokens": shard["tokens"]})
            for key in ("docs", "tokens", "bytes"):
                total[key] += counts[key]
        for source, by_split in result["tokens_per_source"].items():
            for name, n in by_split.items():
                per_source_tokens[source][name] += n
        dropped.update(result["dropped"])
        if contamination is not None:
            contamination.rows += result["matches"]
        for batch in (b for p in result["spans"] for b in pq.ParquetFile(open_input(p)).iter_batches(1 << 16)):
            split, local = batch.column("split").to_pylist(), batch.column("shard_in_part").to_pylist()
            shard = [None if k is None else global_name[s, k] for s, k in zip(split, local, strict=True)]
            ledger.record_columns(
                {name: batch.column(name) for name in ("doc_id", "source", "fate", "reason", "score", "split")}
                | {
                    "shard": pa.array(shard, pa.string()),
                    "token_start": batch.column("token_start"),
                    "token_end": batch.column("token_end"),
                }
            )
    ledger.close()
    if remote:
        remove_prefix(parts_dir)
    else:
        shutil.rmtree(parts_dir, ignore_errors=True)
    for s in splits.values():
        s["bytes_per_token"] = round(s["bytes"] / s["tokens"], 4) if s["tokens"] else None
    kept = sum(s["docs"] for s in splits.values())
    tokenizer = _tokenizer(str(tokenizer_dir))
    extra = {"contamination": contamination.write(ctx.out_dir / "contamination")} if contamination else {}
    extra |= {
        "tokens": sum(s["tokens"] for s in splits.values()),
        "dtype": token_dtype(tokenizer.get_vocab_size()).name,
        "eot_id": tokenizer.token_to_id(tok_cfg.special_tokens[0]),
        "vocab_size": tokenizer.get_vocab_size(),
        "splits": {
            k: {f: v[f] for f in ("docs", "tokens", "bytes", "bytes_per_token", "shards")} for k, v in splits.items()
        },
        "tokens_per_source": {k: dict(v) for k, v in sorted(per_source_tokens.items())},
    }
    return StageResult(DocCounts(kept + sum(dropped.values()), kept, dropped), extra)


def _has_split_key(doc_paths: list) -> bool:
    return bool(doc_paths) and "split_key" in pq.ParquetFile(open_input(doc_paths[0])).schema_arrow.names


_INDEXES: dict[str, NgramIndex] = {}


def _index(name: str, where: str) -> NgramIndex:
    """A saved n-gram index (path or URI), loaded once per worker process."""
    if where not in _INDEXES:
        _INDEXES[where] = NgramIndex.load(name, open_input(where))
    return _INDEXES[where]


def _save_index(index: NgramIndex, number: int, ctx: StageContext, parts_dir: str) -> str:
    """Save an n-gram index where every part can load it: the work folder, or the attempt's ``.parts/``."""
    path = ctx.work_dir / "indexes" / f"index-{number:03d}.npz"
    index.save(path)
    if not is_remote(parts_dir):
        return str(path)
    put_files(path.parent, f"{parts_dir}/indexes", [path.name])
    return f"{parts_dir}/indexes/{path.name}"
