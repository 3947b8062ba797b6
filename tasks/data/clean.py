"""Clean: normalize text, redact PII, and score every document with the quality filters of its preset.

Per document: Unicode NFC, line endings, control characters, mojibake repair (ftfy, only where the text
shows mojibake), e-mail / IP redaction; the result is what is hashed and passed on. Then the basic size
rules and the filters of the document's preset (``prose`` / ``code`` / ...; chosen by source or extension,
see ``CleanConfig``) run over Arrow record batches. The first failing rule names the drop reason; all
statistics go to the ledger's ``scores`` map. Parts of the input run in parallel processes.
"""

from __future__ import annotations

import ipaddress
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.artifacts import StageContext
from storage.hashing import text_hash
from storage.shards import DOC_SCHEMA, LedgerWriter, ParquetShardWriter
from tasks.config import CleanConfig, PiiConfig
from tasks.data import filters
from tasks.data.filters import FilterResult, Rule, TextBatch, apply_rules
from tasks.parts import balanced_groups, map_parts
from tasks.stage_contract import DocCounts, StageResult

VERSION = "3"  # 3: ledger in sorted parts with an index (storage/ledger.py)

CLEAN_SCHEMA = DOC_SCHEMA.append(pa.field("content_hash", pa.string()))
SCORES_TYPE = pa.map_(pa.string(), pa.float64())

# C0/C1 control characters except tab and newline, plus stray surrogates and the BOM.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufeff]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
# UTF-8 read as Latin-1/cp1252 leaves a lead character followed by a continuation-looking one (Ã©, â€™).
_MOJIBAKE_HINT = re.compile(
    "[\u00c2-\u00f4][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u2013-\u203a\u20ac\u2122]"
)
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?!\.?\d)")
_FTFY_CONFIG = None


def _fix_mojibake(text: str) -> str:
    global _FTFY_CONFIG
    import ftfy

    if _FTFY_CONFIG is None:
        _FTFY_CONFIG = ftfy.TextFixerConfig(
            unescape_html=False,
            remove_terminal_escapes=False,
            uncurl_quotes=False,
            fix_latin_ligatures=False,
            fix_character_width=False,
            fix_line_breaks=False,
            normalization=None,
            explain=False,
        )
    return ftfy.fix_text(text, _FTFY_CONFIG)


def normalize(text: str, fix_mojibake: bool = False) -> str:
    """The canonical text form: what is hashed, deduplicated and tokenized."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii():
        if fix_mojibake and _MOJIBAKE_HINT.search(text):
            text = _fix_mojibake(text)
        text = unicodedata.normalize("NFC", text)
        text = _CONTROL.sub("", text)
    elif _CONTROL.search(text):
        text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text)
    return text.strip("\n")


def _public_ip(match: re.Match[str], placeholder: str, counter: list[int]) -> str:
    try:
        public = ipaddress.IPv4Address(match.group(0)).is_global
    except ValueError:  # e.g. leading zeros ("010.1.1.1"): not an address Python accepts; leave it
        public = False
    if public:
        counter[0] += 1
        return placeholder
    return match.group(0)


def redact_pii(text: str, cfg: PiiConfig) -> tuple[str, int, int]:
    """Replace e-mail addresses and public IPv4 addresses with placeholders; return (text, emails, ips)."""
    emails = ips = 0
    if not cfg.enabled:
        return text, 0, 0
    if cfg.emails and "@" in text:
        text, emails = _EMAIL.subn(cfg.email_placeholder, text)
    if cfg.ips and "." in text:
        counter = [0]
        text = _IPV4.sub(lambda m: _public_ip(m, cfg.ip_placeholder, counter), text)
        ips = counter[0]
    return text, emails, ips


# --- presets -----------------------------------------------------------------------------------------------

_LOCATOR_SUFFIX = re.compile(r"(?:[:#]\d+-?)$")


def extension_of(locator: str) -> str:
    name = _LOCATOR_SUFFIX.sub("", locator).rsplit("/", 1)[-1].lower()
    for compressed in (".gz", ".zst"):
        name = name.removesuffix(compressed)
    return os.path.splitext(name)[1]


def preset_for(source: str, locator: str, cfg: CleanConfig) -> str:
    """Which filter preset applies: by source name, else by file extension, else the default."""
    if source in cfg.preset_by_source:
        return cfg.preset_by_source[source]
    return cfg.preset_by_extension.get(extension_of(locator), cfg.default_preset)


# --- one batch ---------------------------------------------------------------------------------------------


@dataclass
class BatchOutcome:
    texts: list[str]
    keep: np.ndarray
    reason: list[str | None]
    score: np.ndarray
    scores: pa.Array  # map<string, double> per document


def _merge_first_failure(into: FilterResult, result: FilterResult, rows: np.ndarray) -> None:
    """Fold ``result`` (for batch rows ``rows``) into ``into``: an earlier failure keeps its reason."""
    for j in np.flatnonzero(~result.keep):
        i = rows[j]
        if into.keep[i]:
            into.keep[i] = False
            into.reason[i] = result.reason[j]
            into.score[i] = result.score[j]


def _scores_array(names: list[str], matrix: np.ndarray) -> pa.Array:
    n, k = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    keys = pa.array(np.tile(np.array(names, dtype=object), n), pa.string())
    return pa.MapArray.from_arrays(offsets, keys, pa.array(matrix.ravel(), pa.float64()), type=SCORES_TYPE)


def clean_batch(texts: list[str], sources: list[str], locators: list[str], cfg: CleanConfig) -> BatchOutcome:
    """Normalize, redact and filter one batch of documents."""
    n = len(texts)
    out: list[str] = []
    extras = np.zeros((n, 3))
    for i, raw in enumerate(texts):
        text = normalize(raw, cfg.fix_mojibake)
        mojibake = cfg.fix_mojibake and text != raw and _MOJIBAKE_HINT.search(raw) is not None
        text, emails, ips = redact_pii(text, cfg.pii)
        extras[i] = (emails, ips, mojibake)
        out.append(text)
    batch = TextBatch(out)
    basic = {"chars": batch.chars.astype(np.float64), "blank": batch.count(lambda t: not t.strip())}
    result = apply_rules(
        "doc",
        basic,
        [
            Rule("empty", "blank", high=0),
            Rule("too_short", "chars", cfg.min_chars, None),
            Rule("too_long", "chars", None, cfg.max_chars),
        ],
        n,
    )
    base_names = ["doc.chars", "pii.emails", "pii.ips", "normalize.mojibake_fixed"]
    base = np.column_stack([basic["chars"], extras])
    presets = [preset_for(s, loc, cfg) for s, loc in zip(sources, locators, strict=True)]
    parts: list[pa.Array] = []
    order: list[np.ndarray] = []
    for name in sorted(set(presets)):
        rows = np.array([i for i, p in enumerate(presets) if p == name], dtype=np.int64)
        sub = TextBatch([out[i] for i in rows]) if len(rows) < n else batch
        names = list(base_names)
        columns = [base[rows]]
        for res in filters.run_preset(sub, cfg.presets[name]):
            _merge_first_failure(result, res, rows)
            names += list(res.scores)
            columns.append(np.column_stack(list(res.scores.values())))
        names.append(f"preset.{name}")
        columns.append(np.ones((len(rows), 1)))
        parts.append(_scores_array(names, np.hstack(columns)))
        order.append(rows)
        c4 = cfg.presets[name].c4
        if c4.enabled and c4.remove_bad_lines:
            for i in rows:
                out[i] = filters.c4_remove_bad_lines(out[i], c4)
    inverse = np.argsort(np.concatenate(order), kind="stable")
    scores = pc.take(pa.concat_arrays(parts), pa.array(inverse))
    return BatchOutcome(out, result.keep, result.reason, result.score, scores)


# --- one part and the whole stage -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CleanPart:
    index: int
    units: list[tuple[str, int]]  # (parquet file, row group)
    cfg: CleanConfig
    out_dir: str
    batch_rows: int
    blocked: frozenset[str] = frozenset()  # doc ids and content hashes taken down through lineage


def _drop_blocked(result: BatchOutcome, doc_ids: list[str], hashes: list[str], blocked: frozenset[str]) -> None:
    """Taken-down documents are dropped as ``takedown``, whatever the filters said."""
    for i, (doc_id, digest) in enumerate(zip(doc_ids, hashes, strict=True)):
        if doc_id in blocked or digest in blocked:
            result.keep[i] = False
            result.reason[i] = "takedown"
            result.score[i] = np.nan


def clean_part(part: CleanPart) -> DocCounts:
    """Clean the row groups of one part into ``docs/docs-<part>-*.parquet`` and ``ledger/ledger-<part>-*``."""
    out = Path(part.out_dir)
    docs = ParquetShardWriter(out / "docs", f"docs-{part.index:05d}", CLEAN_SCHEMA)
    ledger = LedgerWriter(out / "ledger", "clean", prefix=f"ledger-{part.index:05d}")
    reasons: Counter[str] = Counter()
    docs_in = 0
    for path, row_group in part.units:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=part.batch_rows, row_groups=[row_group]):
            docs_in += batch.num_rows
            result = clean_batch(
                batch.column("text").to_pylist(),
                batch.column("source").to_pylist(),
                batch.column("locator").to_pylist(),
                part.cfg,
            )
            digests = [text_hash(t) for t in result.texts]
            if part.blocked:
                _drop_blocked(result, batch.column("doc_id").to_pylist(), digests, part.blocked)
            hashes = pa.array(digests, pa.string())
            texts = pa.array(result.texts, pa.large_string())
            keep = pa.array(result.keep)
            reasons.update(r for r in result.reason if r is not None)
            ledger.record_columns(
                {
                    "doc_id": batch.column("doc_id"),
                    "source": batch.column("source"),
                    "locator": batch.column("locator"),
                    "content_hash": hashes,
                    "fate": pa.array(np.where(result.keep, "kept", "dropped"), pa.string()),
                    "reason": pa.array(result.reason, pa.string()),
                    "score": pa.array(result.score, pa.float64(), mask=np.isnan(result.score)),
                    "scores": result.scores,
                }
            )
            table = pa.Table.from_batches([batch]).set_column(DOC_SCHEMA.get_field_index("text"), "text", texts)
            table = table.set_column(
                DOC_SCHEMA.get_field_index("n_bytes"), "n_bytes", pc.cast(pc.binary_length(texts), pa.int64())
            )
            docs.write(table.append_column("content_hash", hashes).filter(keep))
    docs.close()
    ledger.close()
    return DocCounts(docs_in, docs.rows, reasons)


def _uncompressed_bytes(path: Path) -> int:
    meta = pq.ParquetFile(path).metadata
    return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))


def plan_parts(doc_paths: list[Path], part_bytes: int) -> list[list[tuple[str, int]]]:
    """Split the input row groups into consecutive parts of about ``part_bytes`` (independent of workers)."""
    units: list[tuple[str, int]] = []
    sizes: list[int] = []
    for path in doc_paths:
        meta = pq.ParquetFile(path).metadata
        for rg in range(meta.num_row_groups):
            units.append((str(path), rg))
            sizes.append(meta.row_group(rg).total_byte_size)
    return [[units[i] for i in group] for group in balanced_groups(sizes, part_bytes, 10_000)]


def clean(
    doc_paths: list[Path],
    cfg: CleanConfig,
    ctx: StageContext,
    batch_rows: int = 1024,
    workers: int | None = None,
    part_bytes: int | None = None,
    blocked: set[str] | None = None,
) -> StageResult:
    """Normalize and filter raw documents into ``docs/`` with a ledger row per input document.

    The input is cut into parts by size alone (default: about 16 parts, 1–256 MiB each), never by the number
    of workers, so the output files are the same whatever ``workers`` is. ``blocked`` holds doc ids and content
    hashes taken down through lineage: they are dropped as ``takedown``.
    """
    if part_bytes is None:
        total = sum(_uncompressed_bytes(p) for p in doc_paths)
        part_bytes = min(max(total // 16, 2**20), 256 * 2**20)
    plan = plan_parts(doc_paths, part_bytes)
    frozen = frozenset(blocked or ())
    parts = [CleanPart(i, units, cfg, str(ctx.out_dir), batch_rows, frozen) for i, units in enumerate(plan)]
    ctx.log(f"clean: {len(parts)} parts")
    results = map_parts(
        clean_part, parts, workers, lambda done, total: ctx.progress(done / total, f"{done}/{total} parts")
    )
    (ctx.out_dir / "docs").mkdir(parents=True, exist_ok=True)
    return StageResult(DocCounts.total(results))
