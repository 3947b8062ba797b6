"""Ingest: read sources (folders of text files, JSONL / JSONL.gz) into raw Parquet document shards.

Every record found becomes exactly one ledger row: ``kept`` (passed on) or ``dropped`` with a reason
(binary file, invalid UTF-8, oversized, malformed JSON line, missing text field, unreadable or truncated
file). Document ids derive from (source name, locator), so a document keeps its id across runs.
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from storage.artifacts import StageContext
from storage.hashing import stable_id
from storage.shards import DOC_SCHEMA, LedgerWriter, ParquetShardWriter
from tasks.config import SourceConfig

VERSION = "1"
BINARY_SNIFF_BYTES = 8192


@dataclass
class Record:
    """One document found in a source, or the reason it could not be read."""

    source: str
    locator: str
    text: str | None
    reason: str | None = None


def doc_id_for(source: str, locator: str) -> str:
    return f"{source}:{stable_id(source, locator)}"


def _file_kind(path: Path, configured: str) -> str:
    if configured != "auto":
        return configured
    name = path.name.lower()
    return "jsonl" if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")) else "text"


def list_files(source: SourceConfig) -> list[tuple[Path, str]]:
    """Files of a source in a stable order, as (path, path relative to the source)."""
    root = source.resolved_path()
    if not root.exists():
        raise FileNotFoundError(f"source {source.name!r}: {root} does not exist")
    if root.is_file():
        return [(root, root.name)]
    found: list[tuple[Path, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = [
            d for d in dirnames if d != "__pycache__" and not _excluded(os.path.join(rel_dir, d, ""), source.exclude)
        ]
        for name in sorted(filenames):
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if not name.lower().endswith(tuple(source.include_ext)) or _excluded(rel, source.exclude):
                continue
            found.append((Path(dirpath) / name, rel))
    return found[: source.max_files] if source.max_files else found


def _excluded(rel: str, patterns: list[str]) -> bool:
    rel = rel.removeprefix("./")
    return any(fnmatch.fnmatch(rel, p) for p in patterns)


def _read_text_file(source: SourceConfig, path: Path, rel: str) -> Iterator[Record]:
    try:
        size = path.stat().st_size
        if size > source.max_file_bytes:
            yield Record(source.name, rel, None, "too_large_file")
            return
        data = path.read_bytes()
    except OSError as err:
        yield Record(source.name, rel, None, f"unreadable:{type(err).__name__}")
        return
    if b"\x00" in data[:BINARY_SNIFF_BYTES]:
        yield Record(source.name, rel, None, "binary")
        return
    try:
        yield Record(source.name, rel, data.decode("utf-8"))
    except UnicodeDecodeError:
        yield Record(source.name, rel, None, "invalid_utf8")


def _read_jsonl_file(source: SourceConfig, path: Path, rel: str) -> Iterator[Record]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    line_no = 0
    try:
        with opener(path, "rb") as fh:
            for line_no, raw in enumerate(fh, start=1):  # noqa: B007 - line_no is read after the loop
                locator = f"{rel}:{line_no}"
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    yield Record(source.name, locator, None, "malformed_json")
                    continue
                text = obj.get(source.text_field) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    yield Record(source.name, locator, None, "missing_text_field")
                    continue
                yield Record(source.name, locator, text)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        # The rest of a truncated or unreadable file is one ledger row, located after the last good line.
        yield Record(source.name, f"{rel}:{line_no + 1}-", None, f"unreadable:{type(err).__name__}")


def read_source(source: SourceConfig) -> Iterator[Record]:
    for path, rel in list_files(source):
        if _file_kind(path, source.kind) == "jsonl":
            yield from _read_jsonl_file(source, path, rel)
        else:
            yield from _read_text_file(source, path, rel)


def ingest(sources: list[SourceConfig], ctx: StageContext, batch_rows: int = 1024) -> dict:
    """Read every source into ``docs/docs-*.parquet`` and ``ledger/ledger-*.parquet`` under ``ctx.out_dir``."""
    reasons: Counter[str] = Counter()
    per_source: Counter[str] = Counter()
    docs = ParquetShardWriter(ctx.out_dir / "docs", "docs", DOC_SCHEMA)
    ledger = LedgerWriter(ctx.out_dir / "ledger", "ingest")
    doc_rows: list[dict] = []
    ledger_rows: list[dict] = []
    ordinal = 0
    bytes_kept = 0
    for source in sources:
        for record in read_source(source):
            doc_id = doc_id_for(record.source, record.locator)
            per_source[record.source] += 1
            if record.reason is None:
                assert record.text is not None
                n_bytes = len(record.text.encode("utf-8", "surrogatepass"))
                bytes_kept += n_bytes
                doc_rows.append(
                    {
                        "doc_id": doc_id,
                        "source": record.source,
                        "locator": record.locator,
                        "ordinal": ordinal,
                        "text": record.text,
                        "n_bytes": n_bytes,
                    }
                )
                fate, reason = "kept", None
            else:
                fate, reason = "dropped", record.reason
                reasons[record.reason] += 1
            ledger_rows.append(
                {"doc_id": doc_id, "source": record.source, "locator": record.locator, "fate": fate, "reason": reason}
            )
            ordinal += 1
            if len(doc_rows) >= batch_rows:
                docs.write_rows(doc_rows)
                doc_rows = []
            if len(ledger_rows) >= batch_rows:
                ledger.record(ledger_rows)
                ledger_rows = []
        ctx.log(f"ingest: source {source.name!r}: {per_source[source.name]} records")
    docs.write_rows(doc_rows)
    ledger.record(ledger_rows)
    docs.close()
    ledger.close()
    return {
        "docs_in": ordinal,
        "kept": docs.rows,
        "dropped": dict(sorted(reasons.items())),
        "per_source": dict(per_source),
        "bytes_kept": bytes_kept,
    }
