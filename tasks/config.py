"""The pipeline's parameters: one pydantic model, so the Prefect UI renders a form and bad values fail early."""

from __future__ import annotations

import fnmatch
import re
import sysconfig
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from storage.redaction import redact, without_placeholders
from tasks.errors import UserError

STDLIB = "stdlib"
# The largest seed every consumer takes (numpy, torch, DuckDB's BIGINT column in lineage).
MAX_SEED = 2**63 - 1

# --- secrets ---------------------------------------------------------------------------------------------


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceConfig(Section):
    """One input, named for lineage: a folder or file (local path or fsspec URI) of text, JSONL or Parquet files."""

    name: str = Field(description="Short source name, used in document ids and lineage.", pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(
        description="Folder, file or URI (file://, s3://, memory://) to read; 'stdlib' means this Python's stdlib.",
    )
    kind: Literal["auto", "text", "jsonl", "parquet"] = Field(
        "auto", description="How to read files; 'auto' uses the extension (.jsonl[.gz|.zst], .parquet, else text)."
    )
    include_ext: list[str] = Field(
        default=[".py", ".txt", ".md", ".rst", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet"],
        description="File-name endings to read from a folder (case-insensitive suffix match: '.rst' does not "
        "match 'x.rst.txt'; list '.rst.txt' or '.txt' for those).",
    )
    exclude: list[str] = Field(default=[], description="Glob patterns (relative paths) to skip.")
    text_field: str = Field("text", description="JSONL field / Parquet column holding the document text.")
    id_field: str | None = Field(
        None, description="JSONL field / Parquet column with a document id; ids then derive from it, not position."
    )
    keep_metadata: bool = Field(True, description="Keep the other JSONL fields / Parquet columns as JSON metadata.")
    split: Literal["file", "paragraph", "regex"] = Field(
        "file", description="How a text file becomes documents: whole file, blank-line paragraphs, or split_pattern."
    )
    split_pattern: str | None = Field(None, description="Regex separating documents when split is 'regex'.")
    on_invalid_utf8: Literal["drop", "replace"] = Field(
        "drop", description="Invalid UTF-8: drop the document with a reason, or decode with U+FFFD and record it."
    )
    max_files: int | None = Field(None, ge=1, description="Read at most this many files (sorted order).")
    max_file_bytes: int = Field(64 * 2**20, ge=1, description="Text files larger than this are recorded as dropped.")
    max_record_bytes: int = Field(
        16 * 2**20, ge=1, description="JSONL lines longer than this are skipped in bounded memory and recorded."
    )
    storage_options: dict[str, Any] = Field(
        default={},
        description="fsspec options (e.g. S3 endpoint). Secret-looking keys (key, secret, token, password) are "
        "never persisted or printed: lineage, manifests and Prefect parameters hold '<redacted>', so a run "
        "started from them (a deployment, `tokenmill stage`) takes credentials from the environment instead.",
    )
    weight: float | None = Field(
        None, gt=0, description="Target share of training tokens (relative to the other sources' weights)."
    )
    max_repeats: float | None = Field(
        None, gt=0, description="With weights: read this source's training windows at most this many times."
    )

    # What the train loader does with the source, not what ingest reads: not part of ingest's fingerprint.
    MIXTURE: ClassVar[frozenset[str]] = frozenset({"weight", "max_repeats"})

    @field_validator("path")
    @classmethod
    def _path_not_blank(cls, path: str) -> str:
        if not path.strip():
            raise ValueError("must name a folder, file or URI (an empty path would read the current directory)")
        return path

    @field_validator("include_ext")
    @classmethod
    def _extensions(cls, extensions: list[str]) -> list[str]:
        if not extensions:
            raise ValueError("is empty, so no file would be read; list endings such as '.txt' or '.jsonl.gz'")
        if any(not e.strip() for e in extensions):
            raise ValueError("an empty extension would match every file; list endings such as '.txt'")
        return [e.lower() for e in extensions]

    @field_validator("storage_options", mode="before")
    @classmethod
    def _drop_redacted(cls, options: object) -> object:
        """A configuration read back from lineage holds ``<redacted>``: leave those out (credentials then come
        from the environment) rather than pass the placeholder to the filesystem as a key."""
        return without_placeholders(options)

    @field_serializer("storage_options")
    def _serialize_options(self, options: dict[str, Any]) -> dict[str, Any]:
        return redact(options)

    @field_serializer("path")
    def _serialize_path(self, path: str) -> str:
        return redact(path)

    def __repr_args__(self):  # noqa: ANN204 - pydantic's own signature
        return [(k, redact(v, "") if k in ("storage_options", "path") else v) for k, v in super().__repr_args__()]

    @model_validator(mode="after")
    def _split_pattern(self) -> SourceConfig:
        if self.split == "regex":
            if not self.split_pattern:
                raise ValueError(f"source {self.name!r}: split 'regex' needs split_pattern")
            try:
                pattern = re.compile(self.split_pattern)
            except re.error as err:
                raise ValueError(f"source {self.name!r}: split_pattern is not a valid regex: {err}") from err
            if _matches_empty(pattern):
                raise ValueError(
                    f"source {self.name!r}: split_pattern {self.split_pattern!r} can match the empty string, which "
                    "would split a file between every character; make it match at least one character"
                )
        return self

    def is_local(self) -> bool:
        return "://" not in self.path or self.path.startswith("file://")

    def resolved_path(self) -> str:
        """The path or URI to read: 'stdlib' resolves to this Python's standard library folder."""
        if self.path == STDLIB:
            return sysconfig.get_paths()["stdlib"]
        return self.path if "://" in self.path else str(Path(self.path).expanduser())


_EMPTY_MATCH_PROBE = "a b\n\nc.\td-e_1\r\n\n\n#x"


def _matches_empty(pattern: re.Pattern[str]) -> bool:
    """Whether a split pattern can match zero characters (at the start, or anywhere in a varied probe text)."""
    return pattern.match("") is not None or any(m.end() == m.start() for m in pattern.finditer(_EMPTY_MATCH_PROBE))


class GopherQualityConfig(Section):
    """Gopher (Rae et al. 2021) document quality heuristics for natural-language text."""

    enabled: bool = True
    min_words: int = Field(50, ge=0)
    max_words: int = Field(100_000, ge=1)
    min_mean_word_length: float = Field(3.0, ge=0)
    max_mean_word_length: float = Field(10.0, ge=0)
    max_symbol_word_ratio: float = Field(0.1, ge=0, description="'#' and '...' per word.")
    max_bullet_lines_ratio: float = Field(0.9, ge=0, le=1)
    max_ellipsis_lines_ratio: float = Field(0.3, ge=0, le=1)
    min_alpha_words_ratio: float = Field(0.8, ge=0, le=1, description="Words with an alphabetic character.")
    min_stop_words: int = Field(2, ge=0, description="Distinct English stop words required (the, be, to, of ...).")


class GopherRepetitionConfig(Section):
    """Gopher repetition heuristics: duplicated lines/paragraphs and n-gram repetition (character fractions)."""

    enabled: bool = True
    max_dup_line_fraction: float = Field(0.3, ge=0, le=1)
    max_dup_para_fraction: float = Field(0.3, ge=0, le=1)
    max_dup_line_char_fraction: float = Field(0.2, ge=0, le=1)
    max_dup_para_char_fraction: float = Field(0.2, ge=0, le=1)
    max_top_ngram_char_fraction: dict[int, float] = Field(
        default={2: 0.2, 3: 0.18, 4: 0.16}, description="n → max share of characters in the most frequent n-gram."
    )
    max_dup_ngram_char_fraction: dict[int, float] = Field(
        default={5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n → max share of characters in n-grams that occur more than once.",
    )


class C4Config(Section):
    """C4 (Raffel et al. 2020) line rules for prose: good lines end in punctuation and have enough words."""

    enabled: bool = True
    min_words_per_line: int = Field(3, ge=0)
    min_good_line_fraction: float = Field(0.0, ge=0, le=1, description="Drop documents with fewer good lines.")
    remove_bad_lines: bool = Field(False, description="Delete the lines that fail the rules (C4 proper).")
    drop_lorem_ipsum: bool = True
    drop_curly_brace: bool = Field(False, description="Drop prose containing '{' (C4 does; off for technical docs).")


class CodeFilterConfig(Section):
    """Source-code heuristics (as in The Stack / StarCoder): long lines, symbol soup, generated files."""

    enabled: bool = True
    max_line_chars: int = Field(1000, ge=1, description="Longest line (minified or data files).")
    max_mean_line_chars: float = Field(100.0, ge=1)
    min_alnum_fraction: float = Field(0.25, ge=0, le=1)
    autogenerated_markers: list[str] = Field(
        default=["auto-generated", "autogenerated", "automatically generated", "generated by", "do not edit"],
        description="Case-insensitive markers searched in the first lines.",
    )
    marker_lines: int = Field(5, ge=1, description="How many leading lines are searched for the markers.")


def _language_codes(codes: list[str] | None) -> list[str] | None:
    bad = [c for c in codes or [] if not re.fullmatch(r"[a-z]{2,3}", c)]
    if bad:
        raise ValueError(f"language codes must be lowercase ISO 639 codes such as 'en' or 'de', got {bad}")
    return codes


class LanguageRule(Section):
    """Language filtering for a preset or a source; a field left null takes the next broader setting.

    Precedence: ``clean.language_by_source`` over the preset's ``language`` over ``clean.languages`` /
    ``clean.min_language_score``.
    """

    exempt: bool | None = Field(None, description="Skip language identification (code presets are exempt).")
    languages: list[str] | None = Field(None, description="Allowed ISO 639 codes; empty list = any language.")
    min_score: float | None = Field(
        None, ge=0, le=1, description="Least probability of an allowed language; below it the document is dropped."
    )

    _codes = field_validator("languages")(_language_codes)


class FilterPreset(Section):
    """A set of quality filters; each one can be switched off or re-tuned."""

    gopher_quality: GopherQualityConfig = GopherQualityConfig(enabled=False)
    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig(enabled=False)
    c4: C4Config = C4Config(enabled=False)
    code: CodeFilterConfig = CodeFilterConfig(enabled=False)
    language: LanguageRule = Field(LanguageRule(), description="Language rule of this preset (null fields inherit).")


def _default_presets() -> dict[str, FilterPreset]:
    return {
        "prose": FilterPreset(
            gopher_quality=GopherQualityConfig(), gopher_repetition=GopherRepetitionConfig(), c4=C4Config()
        ),
        "code": FilterPreset(code=CodeFilterConfig(), language=LanguageRule(exempt=True)),
        "docs": docs_preset(),
        "none": FilterPreset(language=LanguageRule(exempt=True)),
    }


def docs_preset() -> FilterPreset:
    """Technical documentation (.rst, .md): the prose filters, loosened where reference pages differ from prose.

    Calibrated on 562 pages assembled from installed software (``benchmarks/docs_corpus.py``: stdlib API
    reference pages built from docstrings, package READMEs, shipped .md/.rst files), where ``prose`` dropped
    61% of the bytes: repeated API phrasing ("will be called with the") trips Gopher's duplicate n-gram rules,
    identifiers and URLs lengthen words, Markdown headings count as '#' symbols, code lowers the alphabetic-word
    share, and English pages full of identifiers score low on language identification. See docs/ingest_clean.md.
    """
    return FilterPreset(
        gopher_quality=GopherQualityConfig(
            max_mean_word_length=15.0, max_symbol_word_ratio=0.5, min_alpha_words_ratio=0.5
        ),
        gopher_repetition=GopherRepetitionConfig(
            max_dup_line_fraction=0.5,
            max_dup_para_fraction=0.5,
            max_dup_line_char_fraction=0.4,
            max_dup_para_char_fraction=0.4,
            max_top_ngram_char_fraction={2: 0.3, 3: 0.27, 4: 0.24},
            max_dup_ngram_char_fraction={5: 0.45, 6: 0.42, 7: 0.39, 8: 0.36, 9: 0.33, 10: 0.3},
        ),
        c4=C4Config(),
        language=LanguageRule(min_score=0.2),
    )


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _deep_merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


class PiiConfig(Section):
    enabled: bool = True
    emails: bool = True
    ips: bool = Field(True, description="IPv4 addresses that are globally routable (not private/loopback/docs).")
    email_placeholder: str = "<EMAIL>"
    ip_placeholder: str = "<IP>"


class CleanConfig(Section):
    """Quality filters: documents failing one are dropped with that reason in the ledger."""

    min_chars: int = Field(64, ge=0, description="Drop documents shorter than this after normalization.")
    max_chars: int = Field(500_000, ge=1, description="Drop documents longer than this.")
    fix_mojibake: bool = Field(True, description="Repair mojibake with ftfy (non-ASCII documents only).")
    pii: PiiConfig = PiiConfig()
    presets: dict[str, FilterPreset] = Field(default_factory=_default_presets, description="Named filter sets.")
    default_preset: str = Field("prose", description="Preset for documents no other rule assigns.")
    preset_by_extension: dict[str, str] = Field(
        default={
            **{ext: "code" for ext in (".py", ".pyi", ".c", ".h", ".js", ".rs")},
            **{ext: "docs" for ext in (".rst", ".rst.txt", ".md")},
        },
        description="Preset by the end of the document's file name (from its locator; the longest match wins).",
    )
    preset_by_source: dict[str, str] = Field(default={}, description="Preset by source name (wins over extension).")
    language_id: bool = Field(
        True, description="Identify each document's language (fastText lid.176) unless its preset is exempt."
    )
    languages: list[str] = Field(
        default=["en"], description="Allowed ISO 639 language codes; an empty list keeps every language (scores only)."
    )
    min_language_score: float = Field(
        0.65, ge=0, le=1, description="Least probability of an allowed language (FineWeb and datatrove use 0.65)."
    )
    language_by_source: dict[str, LanguageRule] = Field(
        default={}, description="Language rule per source name (wins over the preset's)."
    )
    language_sample_chars: int = Field(
        2000, ge=16, description="Characters of each document the language is read from."
    )
    warn_dropped_bytes_share: float = Field(
        0.3, ge=0, le=1, description="Warn when the stage drops more than this share of its input bytes."
    )

    # How the stage reports, not what it computes: not part of the stage fingerprint.
    REPORTING: ClassVar[frozenset[str]] = frozenset({"warn_dropped_bytes_share"})

    @field_validator("presets", mode="before")
    @classmethod
    def _merge_presets(cls, given: object) -> object:
        """A preset named like a built-in one only overrides the settings it names (deep merge)."""
        if not isinstance(given, dict):
            return given
        merged: dict[str, Any] = {k: v.model_dump() for k, v in _default_presets().items()}
        for name, value in given.items():
            base = merged.get(name)
            merged[name] = _deep_merge(base, value) if isinstance(base, dict) and isinstance(value, dict) else value
        return merged

    _codes = field_validator("languages")(_language_codes)

    @model_validator(mode="after")
    def _bounds(self) -> CleanConfig:
        if self.min_chars >= self.max_chars:
            raise ValueError(f"clean.min_chars ({self.min_chars}) must be below clean.max_chars ({self.max_chars})")
        named = [self.default_preset, *self.preset_by_extension.values(), *self.preset_by_source.values()]
        unknown = sorted({p for p in named if p not in self.presets})
        if unknown:
            raise ValueError(f"clean: unknown preset(s) {unknown}; defined presets are {sorted(self.presets)}")
        return self


class DedupConfig(Section):
    """Exact and MinHash-LSH near-duplicate removal; see docs/dedup.md for the parameters' effect."""

    exact: bool = Field(True, description="Remove documents whose normalized text is identical to an earlier one.")
    keep: Literal["first", "longest", "source_priority"] = Field(
        "first", description="Which copy of a duplicate group is kept (ties: first seen)."
    )
    source_priority: list[str] = Field(
        default=[], description="With keep=source_priority: source names, most preferred first (others last)."
    )
    near: bool = Field(True, description="Also remove near-duplicates found by MinHash LSH.")
    ngram: int = Field(5, ge=1, le=64, description="Words per shingle.")
    permutations: int = Field(100, ge=1, le=4096, description="MinHash signature length.")
    bands: int = Field(20, ge=1, le=1024, description="LSH bands; bands × rows must not exceed permutations.")
    rows: int = Field(5, ge=1, le=256, description="Signature rows per LSH band.")
    threshold: float = Field(
        0.7, gt=0, le=1, description="Jaccard similarity at or above which a candidate pair is a near-duplicate."
    )
    verify: bool = Field(True, description="Check candidate pairs with exact Jaccard (else the MinHash estimate).")
    fold_numbers: bool = Field(
        True,
        description="Fold every digit run to 0 in shingles (off: documents that differ only in numbers stay apart).",
    )
    bucket_partners: int = Field(
        16,
        ge=1,
        le=4096,
        description="Candidate pairs per LSH bucket member: its pairs with the bucket's best-ranked members, up to "
        "this many (every pair in buckets of up to bucket_partners + 1 documents).",
    )
    minhash_seed: int = Field(
        0,
        ge=0,
        le=MAX_SEED,
        title="Seed of the MinHash permutations",
        description="Distinct from the run seed: changing it re-signs.",
    )
    batch_docs: int = Field(2048, ge=1, description="Documents signed per batch.")
    workers: int | None = Field(None, ge=1, description="Processes that sign documents (default: all cores).")
    against: str | None = Field(
        None,
        description="Earlier dedup artifact (path, or 'latest' in this root) to deduplicate new documents against.",
    )

    @model_validator(mode="after")
    def _banding(self) -> DedupConfig:
        if self.bands * self.rows > self.permutations:
            raise ValueError(
                f"dedup.bands × dedup.rows ({self.bands} × {self.rows}) exceeds "
                f"dedup.permutations ({self.permutations})"
            )
        if self.keep == "source_priority" and not self.source_priority:
            raise ValueError("dedup.keep=source_priority needs dedup.source_priority: a list of source names")
        return self


class TokenizerConfig(Section):
    """The byte-level BPE tokenizer trained on the deduplicated corpus."""

    vocab_size: int = Field(4096, ge=260, le=2**20, description="BPE vocabulary size (including specials).")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a merge.")
    sample_fraction: float = Field(1.0, gt=0, le=1, description="Fraction of kept documents used for training.")
    holdout_fraction: float = Field(
        0.02, ge=0, lt=0.5, description="Documents held out of tokenizer training to measure bytes per token."
    )
    special_tokens: list[str] = Field(default=["<|endoftext|>", "<|pad|>"], description="First is end-of-text.")
    pretrained: str | None = Field(None, description="Path of an existing tokenizer.json to use instead of training.")

    @field_validator("special_tokens")
    @classmethod
    def _specials(cls, tokens: list[str]) -> list[str]:
        if not tokens:
            raise ValueError("needs at least the end-of-text token (the first one), e.g. ['<|endoftext|>']")
        if any(not t for t in tokens):
            raise ValueError("a special token cannot be the empty string")
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"special tokens must be distinct, got {tokens}")
        return tokens


class TokenizeConfig(Section):
    """Splitting documents into train/val/test and encoding them into token shards."""

    val_fraction: float = Field(0.05, ge=0, lt=0.5, description="Share of documents in the validation split.")
    test_fraction: float = Field(0.05, ge=0, lt=0.5, description="Share of documents in the test split.")
    shard_tokens: int = Field(8_000_000, ge=1024, description="Tokens per shard file.")
    batch_docs: int = Field(512, ge=1, description="Documents encoded per batch.")


class EvalSetConfig(Section):
    """An evaluation set that training documents are checked against (JSONL or Parquet file or folder)."""

    name: str = Field(description="Set name: the drop reason is contaminated:<name>.", pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(description="JSONL (.jsonl[.gz|.zst]) or Parquet file, or a folder of them (local or URI).")
    text_field: str = Field("text", description="Field / column holding the item text.")
    id_field: str | None = Field(None, description="Field / column with the item id (default: file:record).")


class DecontaminateConfig(Section):
    """N-gram overlap of training documents with this run's val/test documents and with named evaluation sets."""

    enabled: bool = Field(True, description="Check every training-bound document before it is tokenized.")
    ngram: int = Field(13, ge=3, le=64, description="Words per n-gram (GPT-3 used 13, marin 8).")
    min_overlap: float = Field(
        0.2, gt=0, le=1, description="Least share of an item's distinct n-grams found in a document to count it."
    )
    action: Literal["drop", "flag"] = Field(
        "drop", description="drop the document (reason contaminated:<set>) or keep it flagged with that reason."
    )
    own_splits: bool = Field(True, description="Check train documents against this run's val and test documents.")
    sets: list[EvalSetConfig] = Field(default=[], description="Evaluation sets (benchmarks) to check against.")

    @field_validator("sets")
    @classmethod
    def _unique_sets(cls, sets: list[EvalSetConfig]) -> list[EvalSetConfig]:
        names = [s.name for s in sets]
        reserved = sorted({"val", "test"} & set(names))
        if reserved or len(set(names)) != len(names):
            raise ValueError(f"decontaminate.sets names must be unique and not val/test (own splits), got {names}")
        return sets


MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},  # tests and smoke runs
    "quickstart": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128},  # ~1M params at vocab 4096
    "small": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256},  # nanoGPT's shakespeare-char model
    "gpt2-124M": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024},
    "gpt2-350M": {"n_layer": 24, "n_head": 16, "n_embd": 1024, "block_size": 1024},
}


class ModelConfig(Section):
    """Model sizes: a named ``preset`` fills the sizes it names; fields given explicitly override it."""

    preset: Literal["tiny", "quickstart", "small", "gpt2-124M", "gpt2-350M"] | None = Field(
        None, description="Named size (tiny, quickstart ~1M, small ~10M, gpt2-124M, gpt2-350M); fields override it."
    )
    n_layer: int = Field(4, ge=1, le=96, description="Transformer blocks.")
    n_head: int = Field(4, ge=1, le=128, description="Attention heads per block; must divide n_embd.")
    n_embd: int = Field(128, ge=8, le=16384, description="Embedding width.")
    block_size: int = Field(128, ge=8, le=32768, description="Context length in tokens.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability during training.")
    arch: Literal["gpt2", "modern"] = Field(
        "gpt2",
        description="gpt2: learned positions, LayerNorm, GELU, tied head. modern: rotary positions, RMSNorm, "
        "QK-norm, untied head, zero-initialised residual projections (docs/training.md).",
    )
    mlp: Literal["relu2", "swiglu"] = Field("swiglu", description="MLP of the modern arch: SwiGLU or ReLU².")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("preset") is not None:
            sizes = MODEL_PRESETS.get(data["preset"])
            if sizes is not None:  # an unknown name is reported by the Literal check
                data = sizes | {k: v for k, v in data.items() if v is not None}
        return data

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        return self

    def sizes(self) -> dict[str, int | float]:
        """The architecture fields alone (what the model is built from), without the preset name."""
        return self.model_dump(exclude={"preset"})


class TrainConfig(Section):
    """The training loop: budget, optimizer, schedule, checkpoints."""

    max_steps: int = Field(300, ge=1, description="Optimizer steps (the budget unless max_tokens is set).")
    max_tokens: int | None = Field(
        None, ge=1, description="Token budget: train ceil(max_tokens / batch tokens) steps instead of max_steps."
    )
    batch_size: int = Field(16, ge=1, description="Sequences per micro-batch and process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (ignored if batch_tokens is set).")
    batch_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens per optimizer step over all processes; sets grad_accum = batch_tokens / "
        "(batch_size * block_size * nproc), which must divide exactly.",
    )
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="adamw for everything, or muon for the blocks' matrices and AdamW for the rest."
    )
    learning_rate: float = Field(3e-3, gt=0, le=1, description="Peak AdamW learning rate.")
    muon_learning_rate: float = Field(0.02, gt=0, le=1, description="Peak Muon learning rate (optimizer muon).")
    schedule: Literal["cosine", "wsd"] = Field(
        "cosine", description="After warm-up: cosine decay, or wsd (constant, then linear decay at the end)."
    )
    decay_fraction: float = Field(0.4, gt=0, le=1, description="Share of the steps the wsd schedule decays over.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak.")
    warmup_steps: int = Field(30, ge=0, description="Linear warm-up steps.")
    align: Literal["none", "bos"] = Field(
        "none", description="Training windows: a fixed grid (none) or one restarted at every document start (bos)."
    )
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the gradient norm to this (0 = off).")
    eval_interval: int = Field(100, ge=1, description="Steps between validation evaluations.")
    eval_batches: int = Field(8, ge=1, description="Batches of the fixed validation subset per periodic eval.")
    checkpoint_interval: int = Field(100, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' uses CUDA when available.")
    compile: bool = Field(False, description="Wrap the model in torch.compile.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores).")
    nproc: int = Field(
        1, ge=1, le=64, description="Data-parallel processes (DDP under torchrun; one per GPU on CUDA, gloo on CPU)."
    )
    nnodes: int = Field(
        1, ge=1, le=1024, description="Machines of a multi-node run, nproc processes each (see docs/scaling.md)."
    )
    rdzv_endpoint: str | None = Field(
        None,
        description="host:port where the nodes meet (torchrun --rdzv_endpoint): the node that runs the train stage, "
        "on a private network. Required when nnodes > 1.",
    )
    rdzv_id: str | None = Field(None, description="Rendezvous id shared by the nodes (default: the stage fingerprint).")
    rdzv_backend: Literal["c10d", "static"] = Field(
        "c10d", description="torchrun rendezvous: c10d (a store on the endpoint) or static (fixed node ranks)."
    )

    # Where and on how many processes the run happens, not what it computes: not part of the stage fingerprint.
    PLACEMENT: ClassVar[frozenset[str]] = frozenset(
        {"threads", "nproc", "nnodes", "rdzv_endpoint", "rdzv_id", "rdzv_backend"}
    )

    @model_validator(mode="after")
    def _multi_node_needs_an_endpoint(self) -> TrainConfig:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("train.nnodes > 1 needs train.rdzv_endpoint (host:port of the node running the stage)")
        if self.rdzv_endpoint and not re.fullmatch(r"\[?[\w.:-]+\]?:\d{1,5}", self.rdzv_endpoint):
            raise ValueError(f"train.rdzv_endpoint must be host:port, got {self.rdzv_endpoint!r}")
        return self


class EvaluateConfig(Section):
    """Held-out loss, perplexity and bits per byte, and a few samples."""

    batch_size: int = Field(32, ge=1, description="Sequences per evaluation batch.")
    max_tokens_per_split: int | None = Field(None, ge=1, description="Cap on evaluated tokens (default: whole split).")
    samples: int = Field(3, ge=0, description="Text samples generated for the report.")
    sample_tokens: int = Field(80, ge=1, description="Tokens per sample.")
    temperature: float = Field(0.8, gt=0, description="Sampling temperature.")
    top_k: int = Field(40, ge=1, description="Sample from the k most likely tokens.")
    top_p: float = Field(
        0.95, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens with this mass."
    )
    prompts: list[str] = Field(
        default=[], description="Sample prompts; empty means the openings of the first held-out documents."
    )
    probe_items: int = Field(200, ge=0, description="Items per probe (last word, multiple choice); 0 = no probes.")


class PipelineConfig(Section):
    """Everything one pipeline run needs."""

    name: str = Field("quickstart", description="Pipeline name, used in run names and lineage.")
    root: str = Field("./data", description="Data root: artifacts, checkpoints and the lineage DuckDB file.")
    seed: int = Field(
        1337, ge=0, le=MAX_SEED, title="Pipeline seed", description="Seed for sampling, initialization and data order."
    )
    workers: int | None = Field(
        None, ge=1, description="Processes for the data stages (default: all cores); outputs do not depend on it."
    )
    executor: Literal["local", "dask", "ray", "prefect-dask", "prefect-ray"] = Field(
        "local",
        description="Where the data stages' parts run: local processes, or a Dask / Ray cluster (see docs/scaling.md); "
        "prefect-dask / prefect-ray make each part a Prefect task run on a DaskTaskRunner / RayTaskRunner.",
    )
    executor_address: str | None = Field(
        None,
        description="Scheduler address of an existing Dask (tcp://host:8786) or Ray (ray://host:10001) cluster; "
        "without one a private local cluster is started per stage.",
    )
    verify_cached: bool = Field(
        True,
        description="Re-hash a cached stage's files (SHA-256) before using them, so bit flips are caught; off checks "
        "only that every file exists with its recorded size (for very large roots, where hashing costs minutes).",
    )
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [
            SourceConfig(
                name="stdlib", path=STDLIB, exclude=["test/**", "*/tests/**", "idlelib/**", "site-packages/**"]
            )
        ],
        min_length=1,
        description="Inputs to ingest; at least one, with unique names.",
    )
    # titles and descriptions: what the Prefect UI shows for each section of the full configuration form
    clean: CleanConfig = Field(CleanConfig(), title="Cleaning", description="Filters, PII masking, size limits.")
    dedup: DedupConfig = Field(DedupConfig(), title="Deduplication", description="Exact and near-duplicate removal.")
    tokenizer: TokenizerConfig = Field(TokenizerConfig(), title="Tokenizer", description="The BPE tokenizer.")
    tokenize: TokenizeConfig = Field(TokenizeConfig(), title="Token shards", description="Splits and shard sizes.")
    decontaminate: DecontaminateConfig = Field(
        DecontaminateConfig(), title="Decontamination", description="Training text overlapping held-out or eval sets."
    )
    model: ModelConfig = Field(ModelConfig(), title="Model", description="The GPT's size (a preset or explicit).")
    train: TrainConfig = Field(TrainConfig(), title="Training", description="Budget, optimizer, schedule, checkpoints.")
    evaluate: EvaluateConfig = Field(EvaluateConfig(), title="Evaluation", description="Metrics, probes, samples.")

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        weighted = [s.name for s in sources if s.weight is not None]
        if weighted and len(weighted) != len(sources):
            unweighted = [n for n in names if n not in weighted]
            raise ValueError(f"sources[].weight: give every source a weight or none; missing for {unweighted}")
        if any(s.max_repeats is not None for s in sources) and not weighted:
            raise ValueError("sources[].max_repeats applies to weighted sources: set sources[].weight too")
        return sources

    @model_validator(mode="after")
    def _root_outside_sources(self) -> PipelineConfig:
        """A source folder holding the data root would ingest the pipeline's own outputs on the next run."""
        if "://" in self.root:
            return self
        root = Path(self.root).expanduser().resolve()
        for i, source in enumerate(self.sources):
            if not source.is_local() or source.path == STDLIB:
                continue
            folder = Path(source.resolved_path().removeprefix("file://")).resolve()
            if root == folder or folder in root.parents:
                rel = root.relative_to(folder).as_posix()
                if rel != "." and any(fnmatch.fnmatch(rel + "/", p) for p in source.exclude):
                    continue
                raise ValueError(
                    f"sources[{i}] ({source.name!r}) path {source.path!r} contains the data root {self.root!r}: "
                    f"it would ingest the pipeline's own outputs; put the root elsewhere"
                    + (f" or add '{rel}/**' to its exclude" if rel != "." else "")
                )
        return self

    def mixture(self) -> dict[str, Any] | None:
        """Source weights and repeat caps for the train loader, or None when the sources are not weighted."""
        if self.sources[0].weight is None:
            return None
        return {
            "sources": [s.name for s in self.sources],
            "weights": [s.weight for s in self.sources],
            "max_repeats": [s.max_repeats for s in self.sources],
        }

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: object) -> PipelineConfig:
        """Load a YAML file; any problem (unreadable, not UTF-8, bad YAML, not a mapping, invalid settings) is a
        one-line ``UserError`` naming the file."""
        data = read_yaml_mapping(path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return validated(data, str(path))


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML settings file, or a ``UserError`` naming the file and what is wrong."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read the configuration: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: the configuration is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = {list: "list", str: "string", bool: "true/false", int: "number", float: "number"}.get(type(data))
        raise UserError(
            f"{path}: expected a mapping of settings at the top level (name:, sources:, ...), got a "
            f"{kind or type(data).__name__}"
        )
    return data


def validation_message(err: ValidationError) -> str:
    """A pydantic error as one line, ``field: reason; ...``, without echoing input values (they can be secrets)."""
    parts = []
    for e in err.errors(include_url=False, include_input=False, include_context=False):
        field = ".".join(str(p) for p in e["loc"])
        message = e["msg"].removeprefix("Value error, ")
        parts.append(f"{field}: {message}" if field else message)
    return "; ".join(parts)


def validated(data: dict[str, Any], origin: str = "configuration") -> PipelineConfig:
    """``PipelineConfig`` from a mapping, or a one-line ``UserError`` naming ``origin`` and each bad field."""
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(f"{origin}: invalid configuration: {validation_message(err)}") from None
