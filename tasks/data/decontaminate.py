"""Decontamination: n-gram overlap of training-bound documents with evaluation items.

Text is normalized as near-duplicate detection does (lowercase, punctuation → space, digit runs → 0) and cut
into word n-grams, hashed to 64 bits with xxh3 (``tasks.data.minhash``). An evaluation set — the run's own val
and test documents, or a benchmark file the user names — becomes an ``NgramIndex``: its distinct (n-gram, item)
pairs sorted by n-gram. A document is checked with one ``searchsorted`` of its n-grams into that array; only
documents with a hit are looked at further. An item overlaps a document by the share of the item's distinct
n-grams found in the document; at ``min_overlap`` or more the document is contaminated by that item.

Before the sorted array, a one-hash Bloom filter (2^24 bits of the n-grams' low bits) discards most misses with
one gather. The set filter was measured against a DuckDB hash join of the same n-grams
(``benchmarks/decontaminate.py``). A benchmark set's index is a pure function of its file content and the
settings, so it is cached under ``<root>/.cache/decontaminate/`` and reused by every refresh.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from tasks.config import EvalSetConfig, SourceConfig
from tasks.data.minhash import NORMALIZATION_VERSION, MinHasher, MinHashParams, dedup_words
from tasks.errors import UserError

INDEX_VERSION = "1"
BITMAP_BITS = 24


def ngram_hasher(n: int) -> MinHasher:
    """The n-gram hasher shared by indexes and documents (seed 0: the same hashes in every process)."""
    return MinHasher(MinHashParams(ngram=n, permutations=1, bands=1, rows=1))


@dataclass
class NgramIndex:
    """The distinct n-grams of an evaluation set's items, sorted, with the item each belongs to."""

    name: str
    grams: np.ndarray  # uint64, sorted (a gram shared by k items appears k times)
    items: np.ndarray  # int64 item index per gram
    item_ids: list[str]
    item_grams: np.ndarray  # distinct n-grams per item
    skipped: int = 0  # items with fewer words than n (no n-gram), not checked

    @classmethod
    def build(cls, name: str, batches: Iterable[tuple[list[str], list[str]]], n: int) -> NgramIndex:
        """Index batches of (texts, ids); items with fewer than ``n`` words have no n-gram and are counted."""
        hasher = ngram_hasher(n)
        grams, items, counts, ids = [], [], [], []
        for texts, batch_ids in batches:
            shingles, offsets = hasher.shingles(texts)
            for j, text in enumerate(texts):
                distinct = np.unique(shingles[offsets[j] : offsets[j + 1]]) if len(dedup_words(text)) >= n else []
                grams.append(np.asarray(distinct, dtype=np.uint64))
                items.append(np.full(len(distinct), len(ids), dtype=np.int64))
                counts.append(len(distinct))
                ids.append(batch_ids[j])
        g = np.concatenate(grams) if grams else np.zeros(0, np.uint64)
        i = np.concatenate(items) if items else np.zeros(0, np.int64)
        order = np.lexsort((i, g))
        item_grams = np.asarray(counts, dtype=np.int64)
        return cls(name, g[order], i[order], ids, item_grams, int((item_grams == 0).sum()))

    @classmethod
    def combine(cls, name: str, parts: list[NgramIndex]) -> NgramIndex:
        """One index of the items of ``parts`` in order: what ``build`` makes from all their batches at once."""
        offsets = np.cumsum([0] + [len(p.item_ids) for p in parts])
        g = np.concatenate([np.zeros(0, np.uint64)] + [p.grams for p in parts])
        i = np.concatenate([np.zeros(0, np.int64)] + [p.items + o for p, o in zip(parts, offsets, strict=False)])
        item_grams = np.concatenate([np.zeros(0, np.int64)] + [p.item_grams for p in parts])
        order = np.lexsort((i, g))
        ids = [item for p in parts for item in p.item_ids]
        return cls(name, g[order], i[order], ids, item_grams, sum(p.skipped for p in parts))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, grams=self.grams, items=self.items, item_ids=np.array(self.item_ids, dtype=object),
                 item_grams=self.item_grams, skipped=self.skipped)  # fmt: skip
        tmp.replace(path)

    @classmethod
    def load(cls, name: str, path: Path) -> NgramIndex:
        with np.load(path, allow_pickle=True) as z:
            return cls(name, z["grams"], z["items"], list(z["item_ids"]), z["item_grams"], int(z["skipped"]))

    @cached_property
    def _bitmap(self) -> np.ndarray:
        """A one-hash Bloom filter of the set's n-grams (2^24 bits): most misses never reach the sorted array."""
        bits = np.zeros(1 << BITMAP_BITS, dtype=bool)
        bits[(self.grams & np.uint64((1 << BITMAP_BITS) - 1)).astype(np.int64)] = True
        return bits

    def hits(self, shingles: np.ndarray) -> np.ndarray:
        """Which of ``shingles`` occur in the set (a boolean mask)."""
        out = np.zeros(len(shingles), dtype=bool)
        if not len(self.grams) or not len(shingles):
            return out
        maybe = np.flatnonzero(self._bitmap[(shingles & np.uint64((1 << BITMAP_BITS) - 1)).astype(np.int64)])
        if len(maybe):
            candidates = shingles[maybe]
            pos = np.minimum(np.searchsorted(self.grams, candidates), len(self.grams) - 1)
            out[maybe] = self.grams[pos] == candidates
        return out

    def overlaps(self, doc_grams: np.ndarray, min_overlap: float) -> list[tuple[str, float]]:
        """(item id, share of the item's n-grams in the document) for every item at ``min_overlap`` or more."""
        found = np.unique(doc_grams[self.hits(doc_grams)])
        if not len(found):
            return []
        lo = np.searchsorted(self.grams, found, side="left")
        hi = np.searchsorted(self.grams, found, side="right")
        owners = np.concatenate([self.items[a:b] for a, b in zip(lo, hi, strict=True)])
        item, shared = np.unique(owners, return_counts=True)
        share = shared / self.item_grams[item]
        keep = share >= min_overlap
        return sorted(
            ((self.item_ids[i], round(float(s), 4)) for i, s in zip(item[keep], share[keep], strict=True)),
            key=lambda pair: (-pair[1], pair[0]),
        )


@dataclass
class Match:
    doc_id: str
    source: str
    set: str
    items: list[tuple[str, float]] = field(default_factory=list)

    @property
    def overlap(self) -> float:
        return self.items[0][1]


def check_batch(
    doc_ids: list[str],
    sources: list[str],
    texts: list[str],
    indexes: list[NgramIndex],
    n: int,
    min_overlap: float,
    shingles: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[list[Match]]:
    """Per document: its matches, one per set it overlaps (sets in the given order).

    ``shingles`` — the texts' n-gram hashes and offsets, when the caller has them already."""
    out: list[list[Match]] = [[] for _ in texts]
    if not indexes or not texts:
        return out
    shingles, offsets = shingles if shingles is not None else ngram_hasher(n).shingles(texts)
    doc_of = np.repeat(np.arange(len(texts)), np.diff(offsets))
    for index in indexes:
        for d in np.unique(doc_of[index.hits(shingles)]):
            items = index.overlaps(shingles[offsets[d] : offsets[d + 1]], min_overlap)
            if items:
                out[d].append(Match(doc_ids[d], sources[d], index.name, items))
    return out


# --- benchmark sets named in the config -----------------------------------------------------------------------


def _set_source(cfg: EvalSetConfig) -> SourceConfig:
    return SourceConfig(
        name=cfg.name, path=cfg.path, text_field=cfg.text_field, id_field=cfg.id_field, keep_metadata=False,
        include_ext=[".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet"],
    )  # fmt: skip


def set_fingerprint(cfg: EvalSetConfig) -> str:
    """A hash of the set's files (content) and reading settings: the set index's cache key and a stage parameter."""
    from tasks.data.readers import list_files, source_filesystem

    source = _set_source(cfg)
    try:
        files = [f for f in list_files(source) if f.error is None]
    except FileNotFoundError:
        files = []
    if not files:
        raise UserError(f"decontaminate.sets[{cfg.name}]: no JSONL or Parquet file at {cfg.path!r}; check the path")
    fs, _ = source_filesystem(source)
    digest = hashlib.sha256(f"{INDEX_VERSION}/{NORMALIZATION_VERSION}/{cfg.text_field}/{cfg.id_field}".encode())
    for f in files:
        digest.update(f.rel.encode() + b"\0")
        with fs.open(f.path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_set(cfg: EvalSetConfig) -> tuple[list[str], list[str]]:
    """The items' texts and ids (``id_field``, else ``<file>:<record>``); an unreadable item is a user error."""
    from tasks.data.readers import list_files, read_file, source_filesystem

    source = _set_source(cfg)
    fs, _ = source_filesystem(source)
    texts, ids = [], []
    for f in list_files(source):
        for record in read_file(fs, f, source):
            if record.text is None:
                raise UserError(
                    f"decontaminate.sets[{cfg.name}]: {record.locator}: {record.reason} "
                    f"(text_field is {cfg.text_field!r}); fix the file or the field name"
                )
            texts.append(record.text)
            ids.append(str(record.key) if record.key is not None else record.locator.rsplit("/", 1)[-1])
    if not texts:
        raise UserError(f"decontaminate.sets[{cfg.name}]: {cfg.path!r} holds no items")
    return texts, ids


def set_index(cfg: EvalSetConfig, n: int, cache_dir: Path | None, fingerprint: str | None = None) -> NgramIndex:
    """The set's n-gram index, from the cache when the same file content was indexed before."""
    key = hashlib.sha256(f"{fingerprint or set_fingerprint(cfg)}/{n}".encode()).hexdigest()[:32]
    path = cache_dir / f"{key}.npz" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            return NgramIndex.load(cfg.name, path)
        except (OSError, ValueError, KeyError):  # a damaged cache entry is rebuilt, never trusted
            path.unlink(missing_ok=True)
    texts, ids = read_set(cfg)
    index = NgramIndex.build(cfg.name, [(texts, ids)], n)
    if path is not None:
        index.save(path)
    return index
