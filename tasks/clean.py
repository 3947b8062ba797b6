"""Clean: normalize text (NFC, line endings, control characters) and drop documents that fail a filter.

A filter is a small function ``(text, config) -> (passes, score)``; the first filter that fails names the
drop reason and its score goes to the ledger, so thresholds can be re-tuned from the ledger later.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from storage.artifacts import StageContext
from storage.hashing import text_hash
from storage.shards import DOC_SCHEMA, LedgerWriter, ParquetShardWriter, iter_batches
from tasks.config import CleanConfig

VERSION = "1"

CLEAN_SCHEMA = DOC_SCHEMA.append(pa.field("content_hash", pa.string()))

# C0/C1 control characters except tab and newline, plus stray surrogates and the BOM.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufeff]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")


def normalize(text: str) -> str:
    """The canonical text form: what is hashed, deduplicated and tokenized."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text)
    return text.strip("\n")


Filter = Callable[[str, CleanConfig], tuple[bool, float]]


def too_short(text: str, cfg: CleanConfig) -> tuple[bool, float]:
    return len(text) >= cfg.min_chars, float(len(text))


def too_long(text: str, cfg: CleanConfig) -> tuple[bool, float]:
    return len(text) <= cfg.max_chars, float(len(text))


def long_line(text: str, cfg: CleanConfig) -> tuple[bool, float]:
    longest = max((len(line) for line in text.split("\n")), default=0)
    return longest <= cfg.max_line_chars, float(longest)


def low_alnum(text: str, cfg: CleanConfig) -> tuple[bool, float]:
    fraction = sum(ch.isalnum() for ch in text) / max(len(text), 1)
    return fraction >= cfg.min_alnum_fraction, round(fraction, 4)


FILTERS: dict[str, Filter] = {
    "too_short": too_short,
    "too_long": too_long,
    "long_line": long_line,
    "low_alnum": low_alnum,
}


def first_failure(text: str, cfg: CleanConfig) -> tuple[str | None, float | None]:
    """Name and score of the first filter the text fails, or (None, None) when it passes all."""
    if not text.strip():
        return "empty", 0.0
    for name, check in FILTERS.items():
        passes, score = check(text, cfg)
        if not passes:
            return name, score
    return None, None


def clean(
    doc_paths: list[Path], cfg: CleanConfig, ctx: StageContext, batch_rows: int = 1024, blocked: set[str] | None = None
) -> dict:
    """Normalize and filter raw documents into ``docs/`` with a ledger row per input document.

    ``blocked`` holds doc ids and content hashes taken down through lineage: they are dropped as ``takedown``.
    """
    blocked = blocked or set()
    reasons: Counter[str] = Counter()
    docs = ParquetShardWriter(ctx.out_dir / "docs", "docs", CLEAN_SCHEMA)
    ledger = LedgerWriter(ctx.out_dir / "ledger", "clean")
    docs_in = 0
    for batch in iter_batches(doc_paths, batch_size=batch_rows):
        kept: list[dict] = []
        rows: list[dict] = []
        for doc in batch.to_pylist():
            docs_in += 1
            text = normalize(doc["text"])
            digest = text_hash(text)
            if doc["doc_id"] in blocked or digest in blocked:
                reason, score = "takedown", None
            else:
                reason, score = first_failure(text, cfg)
            rows.append(
                {
                    "doc_id": doc["doc_id"],
                    "source": doc["source"],
                    "content_hash": digest,
                    "fate": "kept" if reason is None else "dropped",
                    "reason": reason,
                    "score": score,
                }
            )
            if reason is None:
                kept.append(doc | {"text": text, "n_bytes": len(text.encode("utf-8")), "content_hash": digest})
            else:
                reasons[reason] += 1
        docs.write_rows(kept)
        ledger.record(rows)
    docs.close()
    ledger.close()
    return {"docs_in": docs_in, "kept": docs.rows, "dropped": dict(sorted(reasons.items()))}
