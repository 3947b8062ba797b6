"""Clean: normalize text, redact PII, and score every document with the quality filters of its preset.

Per document: Unicode NFC, line endings, control characters, mojibake repair (ftfy, only where the text
shows mojibake), e-mail / IP redaction; the result is what is hashed and passed on. Then the basic size
rules and the filters of the document's preset (``prose`` / ``code`` / ...; chosen by source or extension,
see ``CleanConfig``) run over Arrow record batches. The first failing rule names the drop reason; all
statistics go to the ledger's ``scores`` map. Parts of the input run in parallel processes.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, replace
from itertools import groupby
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.artifacts import FileEntry, StageContext
from storage.hashing import text_hash
from storage.part_outputs import PARTS_PREFIX, fetch_part_files, files_in, part_folder, upload_part_files
from storage.remote import is_remote, opened_input, remove_prefix
from storage.shards import DOC_SCHEMA, LedgerWriter, ParquetShardWriter
from tasks.config import C4Config, CleanConfig, PiiConfig
from tasks.data import filters, language
from tasks.data.filters import FilterResult, Rule, TextBatch, apply_rules
from tasks.errors import UserError
from tasks.parts import balanced_groups, map_parts
from tasks.stage_contract import DocCounts, StageResult

VERSION = "5"  # 5: size rules rerun after C4 line removal, case-insensitive Gopher stop words; 4: language id

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


# A dotted quad is a version number, not an address, when it is glued to a name ("novas-3.1.1.3", "v1.2.3.4",
# "pkg_1.4.0.3"), follows a version word or a product name ("Thunderbird 1.5.0.9", "kernel 2.6.32.27"), or
# carries a release or file suffix ("4.2.1.9-rc2", "foo-1.2.3.4.tar.gz", "libfoo.so.1.2.3.4").
_GLUED_BEFORE = re.compile(r"(?:[A-Za-z_]|[A-Za-z_][-+~]|\.so\.)$")
_WORD_BEFORE = re.compile(r"([A-Za-z][\w-]*)[ \t]+$")
_VERSION_WORDS = frozenset(
    [
        "version",
        "versions",
        "ver",
        "release",
        "releases",
        "rel",
        "build",
        "revision",
        "rev",
        "update",
        "kernel",
        "patch",
        "section",
        "sections",
        "chapter",
        "table",
        "figure",
        "fig",
        "step",
        "part",
        "appendix",
        "item",
        "notes",
        "for",
    ]
)
_ADDRESS_WORDS = frozenset(
    [
        "ip",
        "ipv4",
        "address",
        "addr",
        "server",
        "host",
        "hosts",
        "from",
        "to",
        "via",
        "gateway",
        "gw",
        "dns",
        "proxy",
        "peer",
        "peers",
        "client",
        "remote",
        "connect",
        "connecting",
        "ping",
        "source",
        "src",
        "destination",
        "dst",
        "target",
        "node",
        "at",
        "blocked",
        "allow",
        "deny",
        "route",
        "mask",
        "a",
    ]
)
_SUFFIX_AFTER = re.compile(
    r"^(?:[-+~]?(?:alpha|beta|rc|dev|post|pre|final|[ab]\d)|[A-Za-z_]|\.(?:tar|zip|whl|gz|deb|rpm|exe)\b)"
)


def is_public_ipv4(text: str) -> bool:
    try:
        return ipaddress.IPv4Address(text).is_global
    except ValueError:  # e.g. leading zeros ("010.1.1.1"): not an address Python accepts; leave it
        return False


def looks_like_version(text: str, start: int, end: int) -> bool:
    """Whether the dotted quad at ``text[start:end]`` reads as a version or section number in its context."""
    before = text[max(0, start - 40) : start]
    if _GLUED_BEFORE.search(before) or _SUFFIX_AFTER.match(text[end : end + 8]):
        return True
    word = _WORD_BEFORE.search(before)
    if word is None:
        return False
    name = word.group(1)
    if name.lower() in _VERSION_WORDS:
        return True
    # a product name: capitalized with lowercase letters, not an address word ("Thunderbird 1.5.0.9", "OpenSSL
    # 1.0.2.5", but "Server 151.101.1.69"); after a lowercase word only the version words above count
    return name[0].isupper() and not name.isupper() and len(name) > 2 and name.lower() not in _ADDRESS_WORDS


def _public_ip(match: re.Match[str], placeholder: str, counter: list[int]) -> str:
    if is_public_ipv4(match.group(0)) and not looks_like_version(match.string, match.start(), match.end()):
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


def file_name_of(locator: str) -> str:
    """The lowercased file name of a locator, without its record suffix and compression extension."""
    name = _LOCATOR_SUFFIX.sub("", locator).rsplit("/", 1)[-1].lower()
    for compressed in (".gz", ".zst"):
        name = name.removesuffix(compressed)
    return name


def preset_for(source: str, locator: str, cfg: CleanConfig) -> str:
    """Which filter preset applies: by source name, else by the longest extension the file name ends with
    (``.rst.txt`` before ``.txt``), else the default."""
    if source in cfg.preset_by_source:
        return cfg.preset_by_source[source]
    name = file_name_of(locator)
    for ext in sorted(cfg.preset_by_extension, key=len, reverse=True):
        if name.endswith(ext):
            return cfg.preset_by_extension[ext]
    return cfg.default_preset


# --- language ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LanguageRequirement:
    """The resolved language rule of one document: allowed codes (empty = any) and the least score."""

    allowed: tuple[str, ...]
    min_score: float


def language_requirement(source: str, preset: str, cfg: CleanConfig) -> LanguageRequirement | None:
    """The language rule for a document of ``source`` under ``preset``, or None when it is exempt.

    Each field comes from the most specific place that sets it: the source's rule, the preset's, then clean's.
    """
    if not cfg.language_id:
        return None
    rules = [r for r in (cfg.language_by_source.get(source), cfg.presets[preset].language) if r is not None]

    def pick(field: str, default: object) -> object:
        return next((getattr(r, field) for r in rules if getattr(r, field) is not None), default)

    if pick("exempt", False):
        return None
    return LanguageRequirement(
        tuple(pick("languages", cfg.languages)), float(pick("min_score", cfg.min_language_score))
    )


@dataclass
class LanguageOutcome:
    rows: np.ndarray  # batch rows that were identified
    codes: list[str]
    top_score: np.ndarray
    allowed_score: np.ndarray  # probability of the most likely allowed language (top score when any is allowed)
    min_score: np.ndarray
    result: FilterResult


def identify_languages(
    texts: list[str], requirements: list[LanguageRequirement | None], sample_chars: int
) -> LanguageOutcome:
    """Identify the language of every non-exempt document and apply its rule (drop reason ``language:<code>``)."""
    rows = np.array([i for i, r in enumerate(requirements) if r is not None], dtype=np.int64)
    codes, top, ranked = language.identify([texts[i] for i in rows], sample_chars)
    need = [requirements[i] for i in rows]
    allowed = np.array(
        [
            max((p for c, p in scores.items() if c in req.allowed), default=0.0) if req.allowed else best
            for req, scores, best in zip(need, ranked, top, strict=True)
        ]
    ).reshape(len(rows))
    minimum = np.array([req.min_score if req.allowed else 0.0 for req in need]).reshape(len(rows))
    keep = allowed >= minimum
    reason: list[str | None] = [None if k else f"language:{c}" for k, c in zip(keep, codes, strict=True)]
    score = np.where(keep, np.nan, allowed)
    stats = {"score": top, "allowed_score": allowed, "min_score": minimum}
    rule = Rule("language:*", "language.allowed_score", low=None)  # the bound is per document: language.min_score
    result = FilterResult(keep, reason, score, {f"language.{k}": v for k, v in stats.items()}, [rule])
    return LanguageOutcome(rows, codes, top, allowed, minimum, result)


# --- one batch ---------------------------------------------------------------------------------------------


@dataclass
class BatchOutcome:
    texts: list[str]
    keep: np.ndarray
    reason: list[str | None]
    score: np.ndarray
    scores: pa.Array  # map<string, double> per document
    rules: dict[str, list[Rule]]  # per preset: every rule its documents were held to, in order


def _merge_first_failure(into: FilterResult, result: FilterResult, rows: np.ndarray) -> None:
    """Fold ``result`` (for batch rows ``rows``) into ``into``: an earlier failure keeps its reason."""
    for j in np.flatnonzero(~result.keep):
        i = rows[j]
        if into.keep[i]:
            into.keep[i] = False
            into.reason[i] = result.reason[j]
            into.score[i] = result.score[j]


def _scores_array(names: list[str], matrix: np.ndarray, per_row_key: list[str] | None = None) -> pa.Array:
    """A map array with the same ``names`` per row; ``per_row_key`` (if given) names the last column row by row."""
    n, k = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    keys = np.tile(np.array(names, dtype=object), (n, 1))
    if per_row_key is not None:
        keys[:, -1] = per_row_key
    keys = pa.array(keys.ravel(), pa.string())
    return pa.MapArray.from_arrays(offsets, keys, pa.array(matrix.ravel(), pa.float64()), type=SCORES_TYPE)


def _basic_rules(batch: TextBatch, cfg: CleanConfig) -> FilterResult:
    """The size rules every document passes: not blank, at least ``min_chars``, at most ``max_chars``."""
    stats = {"chars": batch.chars.astype(np.float64), "blank": batch.count(lambda t: not t.strip())}
    rules = [
        Rule("empty", "blank", high=0),
        Rule("too_short", "chars", cfg.min_chars, None),
        Rule("too_long", "chars", None, cfg.max_chars),
    ]
    return apply_rules("doc", stats, rules, batch.n)


def _remove_bad_lines(
    out: list[str], rows: np.ndarray, c4: C4Config, cfg: CleanConfig, result: FilterResult
) -> np.ndarray:
    """C4 line removal on ``out[rows]``, then the size rules again on what is left: a document emptied or cut
    below ``min_chars`` is dropped as ``empty`` / ``too_short`` (not passed on to become a duplicate of every
    other emptied one). Returns the characters left per row."""
    for i in rows:
        out[i] = filters.c4_remove_bad_lines(out[i], c4)
    left = TextBatch([out[i] for i in rows])
    _merge_first_failure(result, _basic_rules(left, cfg), rows)
    return left.chars.astype(np.float64)


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
    result = basic_rules = _basic_rules(batch, cfg)
    basic = result.scores
    base_names = ["doc.chars", "pii.emails", "pii.ips", "normalize.mojibake_fixed"]
    base = np.column_stack([basic["doc.chars"], extras])
    presets = [preset_for(s, loc, cfg) for s, loc in zip(sources, locators, strict=True)]
    requirements = [language_requirement(s, p, cfg) for s, p in zip(sources, presets, strict=True)]
    lang = identify_languages(out, requirements, cfg.language_sample_chars)
    _merge_first_failure(result, lang.result, lang.rows)  # before the quality rules: they assume the language
    lang_row = np.full(n, -1, dtype=np.int64)
    lang_row[lang.rows] = np.arange(len(lang.rows))
    parts: list[pa.Array] = []
    order: list[np.ndarray] = []
    rules: dict[str, list[Rule]] = {}
    for name, identified in sorted(set(zip(presets, lang_row >= 0, strict=True))):
        rows = np.array([i for i, p in enumerate(presets) if p == name and (lang_row[i] >= 0) == identified], np.int64)
        sub = TextBatch([out[i] for i in rows]) if len(rows) < n else batch
        names = list(base_names)
        columns = [base[rows]]
        preset_results = filters.run_preset(sub, cfg.presets[name])
        held_to = rules.setdefault(name, list(basic_rules.rules))
        held_to += [r for r in lang.result.rules if identified and r not in held_to]
        for res in preset_results:
            _merge_first_failure(result, res, rows)
            names += list(res.scores)
            columns.append(np.column_stack(list(res.scores.values())))
            held_to += [r for r in res.rules if r not in held_to]
        c4 = cfg.presets[name].c4
        if c4.enabled and c4.remove_bad_lines:
            names.append("c4.chars_after_line_removal")
            columns.append(_remove_bad_lines(out, rows, c4, cfg, result)[:, None])
        names.append(f"preset.{name}")
        columns.append(np.ones((len(rows), 1)))
        per_row_key = None
        if identified:  # language.score, .allowed_score, .min_score, then language.<code> = its probability
            at = lang_row[rows]
            names += [*lang.result.scores, "language.code"]
            columns.append(np.column_stack([*(v[at] for v in lang.result.scores.values()), lang.top_score[at]]))
            per_row_key = [f"language.{lang.codes[j]}" for j in at]
        parts.append(_scores_array(names, np.hstack(columns), per_row_key))
        order.append(rows)
    inverse = np.argsort(np.concatenate(order), kind="stable")
    scores = pc.take(pa.concat_arrays(parts), pa.array(inverse))
    return BatchOutcome(out, result.keep, result.reason, result.score, scores, rules)


# --- one part and the whole stage -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CleanPart:
    """Row groups of the ingest shards to clean into ``docs/`` and ``ledger/`` under ``out_dir``.

    On a remote root the files are object URIs and ``out_dir`` is the attempt folder: the part writes into a
    scratch folder of its own, uploads its docs there and its ledger fragments under ``.parts/``.
    """

    index: int
    units: list[tuple[str, int]]  # (parquet file: path or URI, row group)
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


@dataclass(frozen=True)
class CleanPartResult:
    """One part's documents, bytes in and dropped per reason, and the rules each preset held documents to."""

    docs: DocCounts
    bytes_in: int
    dropped_bytes: dict[str, int]
    rules: dict[str, list[dict]]
    uploaded: tuple[FileEntry, ...] = ()  # remote roots: the docs files the part put into the attempt folder
    ledger: tuple[FileEntry, ...] = ()  # remote roots: its ledger fragments, under the attempt's ``.parts/``


def clean_part(part: CleanPart) -> CleanPartResult:
    """Clean the row groups of one part into ``docs/docs-<part>-*.parquet`` and ``ledger/ledger-<part>-*``."""
    with part_folder(part.out_dir, "clean-part-") as folder:
        result = _clean_into(part, folder)
        if not is_remote(part.out_dir):
            return result
        docs = upload_part_files(folder, part.out_dir, files_in(folder, "docs"))
        ledger = upload_part_files(folder, f"{part.out_dir}/{PARTS_PREFIX}", files_in(folder, "ledger"))
    return replace(result, uploaded=tuple(docs), ledger=tuple(ledger))


def _row_groups(units: list[tuple[str, int]], batch_rows: int):
    """The record batches of ``units``, row group by row group (a batch never spans two), each input file opened
    once (ranged reads for an object URI)."""
    for path, group in groupby(units, key=lambda unit: unit[0]):
        with opened_input(path) as source:
            pf = pq.ParquetFile(source)
            for _, row_group in group:
                yield from pf.iter_batches(batch_size=batch_rows, row_groups=[row_group])


def _footer(location: str) -> pq.FileMetaData:
    with opened_input(location) as source:
        return pq.read_metadata(source)


def _clean_into(part: CleanPart, out: Path) -> CleanPartResult:
    docs = ParquetShardWriter(out / "docs", f"docs-{part.index:05d}", CLEAN_SCHEMA)
    ledger = LedgerWriter(out / "ledger", "clean", prefix=f"ledger-{part.index:05d}")
    reasons: Counter[str] = Counter()
    dropped_bytes: Counter[str] = Counter()
    rules: dict[str, list[dict]] = {}
    docs_in = bytes_in = 0
    for batch in _row_groups(part.units, part.batch_rows):
        docs_in += batch.num_rows
        sizes = batch.column("n_bytes").to_numpy(zero_copy_only=False)
        bytes_in += int(sizes.sum())
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
        for i in np.flatnonzero(~result.keep):
            dropped_bytes[result.reason[i]] += int(sizes[i])
        for preset, held_to in result.rules.items():
            rules.setdefault(preset, [r.threshold() | {"reason": r.reason} for r in held_to])
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
    return CleanPartResult(DocCounts(docs_in, docs.rows, reasons), bytes_in, dict(dropped_bytes), rules)


def _uncompressed_bytes(meta: pq.FileMetaData) -> int:
    return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))


def plan_parts(
    locations: list[str], part_bytes: int, footers: list[pq.FileMetaData] | None = None
) -> list[list[tuple[str, int]]]:
    """Split the input row groups into consecutive parts of about ``part_bytes`` (independent of workers).

    ``locations``: the input files' paths or object URIs; ``footers``: their Parquet metadata, if already read."""
    units: list[tuple[str, int]] = []
    sizes: list[int] = []
    for location, meta in zip(locations, footers or [_footer(loc) for loc in locations], strict=True):
        for rg in range(meta.num_row_groups):
            units.append((location, rg))
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
    sources: list[str] | None = None,
) -> StageResult:
    """Normalize and filter raw documents into ``docs/`` with a ledger row per input document.

    The input is cut into parts by size alone (default: about 16 parts, 1–256 MiB each), never by the number
    of workers, so the output files are the same whatever ``workers`` is. ``blocked`` holds doc ids and content
    hashes taken down through lineage: they are dropped as ``takedown``.

    ``sources``: where the parts read ``doc_paths`` (object URIs on a remote root; this process then reads only
    their footers, with ranged reads). With ``ctx.attempt_uri`` set the parts upload their docs into the attempt
    folder themselves and their ledger fragments under ``.parts/``; the flow process fetches only those (no
    text) and the ledger is compacted here as for a local root.
    """
    check_language_codes(cfg)
    locations = sources if ctx.attempt_uri and sources is not None else [str(p) for p in doc_paths]
    footers = [_footer(loc) for loc in locations]
    if part_bytes is None:
        total = sum(_uncompressed_bytes(meta) for meta in footers)
        part_bytes = min(max(total // 16, 2**20), 256 * 2**20)
    plan = plan_parts(locations, part_bytes, footers)
    frozen = frozenset(blocked or ())
    out = ctx.attempt_uri or str(ctx.out_dir)
    parts = [CleanPart(i, units, cfg, out, batch_rows, frozen) for i, units in enumerate(plan)]
    ctx.log(f"clean: {len(parts)} parts")
    results = map_parts(clean_part, parts, workers, ctx.parts_done)
    (ctx.out_dir / "docs").mkdir(parents=True, exist_ok=True)
    if ctx.attempt_uri:
        for r in results:
            ctx.uploaded.extend(r.uploaded)
            fetch_part_files(f"{ctx.attempt_uri}/{PARTS_PREFIX}", r.ledger, ctx.out_dir)
        remove_prefix(f"{ctx.attempt_uri}/{PARTS_PREFIX}")
    result = merge_part_results(results)
    warnings = dropped_bytes_warnings(result.as_counts(), cfg.warn_dropped_bytes_share)
    for warning in warnings:
        ctx.log(f"WARNING clean: {warning}")
    return StageResult(result.docs, {**result.extra, "warnings": warnings}) if warnings else result


def merge_part_results(results: list[CleanPartResult]) -> StageResult:
    """The stage's result from its parts': documents and bytes per drop reason, and the rules per preset."""
    dropped_bytes: Counter[str] = Counter()
    rules: dict[str, list[dict]] = {}
    for r in results:
        dropped_bytes.update(r.dropped_bytes)
        for preset, held_to in r.rules.items():
            rules.setdefault(preset, held_to)
    bytes_in = sum(r.bytes_in for r in results)
    extra = {
        "bytes_in": bytes_in,
        "bytes_kept": bytes_in - sum(dropped_bytes.values()),
        "dropped_bytes": dict(sorted(dropped_bytes.items())),
        "rules": dict(sorted(rules.items())),
    }
    return StageResult(DocCounts.total(r.docs for r in results), extra)


def dropped_bytes_warnings(counts: dict, max_share: float) -> list[str]:
    """One line per drop reason (and for the total) whose share of the input bytes exceeds ``max_share``."""
    total = counts.get("bytes_in") or 0
    if not total or "dropped_bytes" not in counts:
        return []
    lines = []
    dropped = sum(counts["dropped_bytes"].values())
    if dropped / total > max_share:
        lines.append(f"dropped {dropped / total:.0%} of the input bytes (warn_dropped_bytes_share {max_share:.0%})")
    for reason, size in sorted(counts["dropped_bytes"].items(), key=lambda kv: -kv[1]):
        if size / total > max_share / 2:
            docs = counts["dropped"].get(reason, 0)
            lines.append(f"{reason} alone dropped {size / total:.0%} of the bytes ({docs} documents)")
    return lines


def check_language_codes(cfg: CleanConfig) -> None:
    """Every configured language code must be one the model knows (before any work is done)."""
    if not cfg.language_id:
        return
    named = set(cfg.languages)
    for rule in [*(p.language for p in cfg.presets.values()), *cfg.language_by_source.values()]:
        named.update(rule.languages or [])
    unknown = sorted(named - language.known_codes())
    if unknown:
        raise UserError(
            f"clean.languages: {unknown} are not languages the model identifies; use ISO 639-1 codes such as en, de, fr"
        )
