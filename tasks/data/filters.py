"""Quality filters over a batch of documents: each returns a keep mask, a reason and a score per document.

A filter computes named statistics for the whole batch (NumPy arrays; the n-gram work is vectorized over
the batch), then ``apply_rules`` compares them with thresholds in order: the first rule a document breaks
names its drop reason and that statistic is its score. Every statistic of every enabled filter goes to the
ledger's ``scores`` map, so a threshold can be re-tuned later from the ledger alone.

Definitions follow Gopher (Rae et al. 2021, appendix A), C4 (Raffel et al. 2020) and The Stack/StarCoder;
words are whitespace-separated tokens, repetition fractions are over the characters of words.
"""

from __future__ import annotations

import operator
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from itertools import chain
from typing import Any

import numpy as np

from tasks.config import C4Config, CodeFilterConfig, FilterPreset, GopherQualityConfig, GopherRepetitionConfig

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_BULLET_LINE = re.compile(r"^[ \t]*[•‣●◦▪\-*]", re.M)
_ELLIPSIS_LINE = re.compile(r"(?:\.\.\.|…)[ \t]*$", re.M)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n+")
_NON_ALNUM = re.compile(r"[\W_]+")
_ASCII_ALNUM = np.zeros(256, dtype=bool)
_ASCII_ALNUM[np.frombuffer(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)] = True
_MIX = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class Rule:
    reason: str
    stat: str
    low: float | None = None
    high: float | None = None

    def threshold(self) -> dict[str, float | str | None]:
        """The rule as the ledger's readers see it: the statistic it compares and its bounds."""
        return {"stat": self.stat, "low": self.low, "high": self.high}


@dataclass
class FilterResult:
    keep: np.ndarray  # bool per document
    reason: list[str | None]  # first broken rule per document
    score: np.ndarray  # the statistic of that rule (nan when kept)
    scores: dict[str, np.ndarray]  # every statistic, prefixed with the filter's name
    rules: list[Rule] = field(default_factory=list)  # the rules applied, with prefixed statistic names


def apply_rules(prefix: str, stats: dict[str, np.ndarray], rules: list[Rule], n: int) -> FilterResult:
    """Evaluate ``rules`` in order over the batch; the first one a document breaks names its reason."""
    keep = np.ones(n, dtype=bool)
    reason: list[str | None] = [None] * n
    score = np.full(n, np.nan)
    for rule in rules:
        value = stats[rule.stat]
        broken = np.zeros(n, dtype=bool)
        if rule.low is not None:
            broken |= value < rule.low
        if rule.high is not None:
            broken |= value > rule.high
        newly = broken & keep
        for i in np.flatnonzero(newly):
            reason[i] = rule.reason
        score[newly] = value[newly]
        keep &= ~broken
    prefixed = [replace(rule, stat=f"{prefix}.{rule.stat}") for rule in rules]
    return FilterResult(keep, reason, score, {f"{prefix}.{k}": v for k, v in stats.items()}, prefixed)


class TextBatch:
    """Normalized texts of a batch with the derived views filters share (computed once, on first use)."""

    def __init__(self, texts: list[str]):
        self.texts = texts
        self.n = len(texts)

    @cached_property
    def words(self) -> list[list[str]]:
        return [t.split() for t in self.texts]

    @cached_property
    def n_words(self) -> np.ndarray:
        return np.fromiter(map(len, self.words), dtype=np.int64, count=self.n)

    @cached_property
    def word_lengths(self) -> np.ndarray:
        return np.fromiter(map(len, chain.from_iterable(self.words)), dtype=np.int64, count=int(self.n_words.sum()))

    @cached_property
    def word_hashes(self) -> np.ndarray:
        total = int(self.n_words.sum())
        hashes = np.fromiter(map(hash, chain.from_iterable(self.words)), dtype=np.int64, count=total)
        return hashes.view(np.uint64)

    @cached_property
    def word_doc(self) -> np.ndarray:
        return np.repeat(np.arange(self.n), self.n_words)

    @cached_property
    def word_pos(self) -> np.ndarray:
        """Position of each word within its document."""
        starts = np.cumsum(self.n_words) - self.n_words
        return np.arange(len(self.word_doc)) - np.repeat(starts, self.n_words)

    @cached_property
    def word_chars(self) -> np.ndarray:
        return np.bincount(self.word_doc, weights=self.word_lengths, minlength=self.n)

    @cached_property
    def lines(self) -> list[list[str]]:
        return [t.split("\n") for t in self.texts]

    @cached_property
    def n_lines(self) -> np.ndarray:
        return np.fromiter(map(len, self.lines), dtype=np.int64, count=self.n)

    @cached_property
    def chars(self) -> np.ndarray:
        return np.fromiter(map(len, self.texts), dtype=np.int64, count=self.n)

    def count(self, fn: Callable[[str], Any]) -> np.ndarray:
        return np.fromiter(map(fn, self.texts), dtype=np.float64, count=self.n)

    def ngram_counts(self, n: int) -> np.ndarray:
        """Per word position: occurrences in its document of the n-gram starting there (0 if none starts there).

        Computed for n = 2, 3, ... in a chain: an n-gram can repeat only where its (n-1)-gram prefix repeats,
        so beyond n = 2 only those positions are hashed and counted — a shrinking set on natural text. Counts
        of 1 are reported as 1 only at n = 2; above that, non-repeating positions read 0 or 1 (never > 1).
        """
        cache = self.__dict__.setdefault("_ngram_counts", {})
        if n in cache:
            return cache[n]
        h = self.word_hashes
        ends = np.repeat(self.n_words, self.n_words)
        if n <= 2:
            candidates = np.flatnonzero(self.word_pos + n <= ends)
        else:
            candidates = np.flatnonzero((self.ngram_counts(n - 1) > 1) & (self.word_pos + n <= ends))
        key = h[candidates]
        for k in range(1, n):
            key = key * _MIX + h[candidates + k]
        key = key * _MIX + self.word_doc[candidates].astype(np.uint64)
        counts = np.zeros(len(h), dtype=np.int64)
        if len(candidates):
            _, inverse, occurrences = np.unique(key, return_inverse=True, return_counts=True)
            counts[candidates] = occurrences[inverse]
        cache[n] = counts
        return counts


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros(len(a), dtype=np.float64), where=b > 0)


# --- Gopher quality -----------------------------------------------------------------------------------------


def gopher_quality(batch: TextBatch, cfg: GopherQualityConfig) -> FilterResult:
    n_words = batch.n_words.astype(np.float64)
    symbols = batch.count(lambda t: t.count("#") + t.count("...") + t.count("…"))
    letters = [sum(map(operator.ne, map(str.lower, w), map(str.upper, w))) for w in batch.words]
    stats = {
        "words": n_words,
        "mean_word_length": _safe_div(batch.word_chars, n_words),
        "symbol_word_ratio": _safe_div(symbols, n_words),
        "bullet_lines": _safe_div(batch.count(lambda t: len(_BULLET_LINE.findall(t))), batch.n_lines),
        "ellipsis_lines": _safe_div(batch.count(lambda t: len(_ELLIPSIS_LINE.findall(t))), batch.n_lines),
        "alpha_words": _safe_div(np.asarray(letters, dtype=np.float64), n_words),
        "stop_words": np.fromiter(
            (len(STOP_WORDS.intersection(map(str.lower, w))) for w in batch.words), np.float64, batch.n
        ),  # case-insensitive: "The" and "THE" are stop words too
    }
    rules = [
        Rule("gopher_word_count", "words", cfg.min_words, cfg.max_words),
        Rule("gopher_mean_word_length", "mean_word_length", cfg.min_mean_word_length, cfg.max_mean_word_length),
        Rule("gopher_symbol_ratio", "symbol_word_ratio", high=cfg.max_symbol_word_ratio),
        Rule("gopher_bullet_lines", "bullet_lines", high=cfg.max_bullet_lines_ratio),
        Rule("gopher_ellipsis_lines", "ellipsis_lines", high=cfg.max_ellipsis_lines_ratio),
        Rule("gopher_alpha_words", "alpha_words", low=cfg.min_alpha_words_ratio),
        Rule("gopher_stop_words", "stop_words", low=cfg.min_stop_words),
    ]
    return apply_rules("gopher", stats, rules, batch.n)


# --- Gopher repetition -------------------------------------------------------------------------------------


def _duplicates(parts: list[str]) -> tuple[float, float, float]:
    """(fraction of parts that repeat an earlier one, fraction of characters in them, total)."""
    parts = [p for p in parts if p.strip()]
    if not parts:
        return 0.0, 0.0, 0.0
    counts = Counter(parts)
    dup = len(parts) - len(counts)
    dup_chars = sum((c - 1) * len(p) for p, c in counts.items() if c > 1)
    total_chars = sum(map(len, parts))
    return dup / len(parts), dup_chars / max(total_chars, 1), float(total_chars)


def gopher_repetition(batch: TextBatch, cfg: GopherRepetitionConfig) -> FilterResult:
    lines = np.array([_duplicates(lines)[:2] for lines in batch.lines]).reshape(batch.n, 2)
    paras = np.array([_duplicates(_PARAGRAPH_BREAK.split(t))[:2] for t in batch.texts]).reshape(batch.n, 2)
    stats = {
        "dup_line_fraction": lines[:, 0],
        "dup_line_char_fraction": lines[:, 1],
        "dup_para_fraction": paras[:, 0],
        "dup_para_char_fraction": paras[:, 1],
    }
    rules = [
        Rule("gopher_dup_lines", "dup_line_fraction", high=cfg.max_dup_line_fraction),
        Rule("gopher_dup_paragraphs", "dup_para_fraction", high=cfg.max_dup_para_fraction),
        Rule("gopher_dup_line_chars", "dup_line_char_fraction", high=cfg.max_dup_line_char_fraction),
        Rule("gopher_dup_para_chars", "dup_para_char_fraction", high=cfg.max_dup_para_char_fraction),
    ]
    lengths = batch.word_lengths
    for n, limit in sorted(cfg.max_top_ngram_char_fraction.items()):
        counts = batch.ngram_counts(n)
        # characters of the n-gram starting at each position (words plus the spaces between them)
        ngram_chars = np.convolve(lengths, np.ones(n, dtype=np.int64))[n - 1 :] + (n - 1) if len(lengths) else lengths
        # the most frequent n-gram (ties: the longest), as count * 2^20 + chars so one maximum finds both
        weight = np.where(counts > 1, counts * 2**20 + np.minimum(ngram_chars, 2**20 - 1), 0)
        best = np.zeros(batch.n, dtype=np.int64)
        np.maximum.at(best, batch.word_doc, weight)
        top = (best >> 20) * (best & (2**20 - 1))
        stats[f"top_{n}gram_char_fraction"] = _safe_div(top.astype(np.float64), batch.word_chars + batch.n_words - 1)
        rules.append(Rule(f"gopher_top_{n}gram", f"top_{n}gram_char_fraction", high=limit))
    for n, limit in sorted(cfg.max_dup_ngram_char_fraction.items()):
        starts = (batch.ngram_counts(n) > 1).astype(np.int64)
        covered_by = np.cumsum(starts)
        covered_by[n:] -= covered_by[:-n].copy()
        dup_chars = np.bincount(batch.word_doc, weights=lengths * (covered_by > 0), minlength=batch.n)
        stats[f"dup_{n}gram_char_fraction"] = _safe_div(dup_chars, batch.word_chars)
        rules.append(Rule(f"gopher_dup_{n}gram", f"dup_{n}gram_char_fraction", high=limit))
    return apply_rules("gopher_rep", stats, rules, batch.n)


# --- C4 ----------------------------------------------------------------------------------------------------


def c4_good_line(min_words: int) -> re.Pattern[str]:
    """A C4 'good' line: at least ``min_words`` words and ending in terminal punctuation."""
    words = max(min_words - 1, 0)
    return re.compile(rf"^[ \t]*(?:\S+[ \t]+){{{words}}}.*[.!?\"'”’][ \t]*$", re.M)


_LOREM = re.compile(r"lorem ipsum", re.I)


def c4_lines(batch: TextBatch, cfg: C4Config) -> FilterResult:
    good = c4_good_line(cfg.min_words_per_line)
    nonempty = batch.count(lambda t: sum(1 for line in t.split("\n") if line.strip()))
    stats = {
        "good_line_fraction": _safe_div(batch.count(lambda t: len(good.findall(t))), nonempty),
        "lorem_ipsum": batch.count(lambda t: _LOREM.search(t) is not None),
        "curly_brace": batch.count(lambda t: "{" in t),
    }
    rules = [Rule("c4_good_lines", "good_line_fraction", low=cfg.min_good_line_fraction)]
    if cfg.drop_lorem_ipsum:
        rules.append(Rule("c4_lorem_ipsum", "lorem_ipsum", high=0))
    if cfg.drop_curly_brace:
        rules.append(Rule("c4_curly_brace", "curly_brace", high=0))
    return apply_rules("c4", stats, rules, batch.n)


def c4_remove_bad_lines(text: str, cfg: C4Config) -> str:
    """C4 proper: keep only the good lines (used when ``remove_bad_lines`` is on)."""
    good = c4_good_line(cfg.min_words_per_line)
    return "\n".join(line for line in text.split("\n") if good.fullmatch(line))


# --- source code --------------------------------------------------------------------------------------------


def _alnum_fraction(text: str) -> float:
    if not text:
        return 0.0
    if text.isascii():
        return float(_ASCII_ALNUM[np.frombuffer(text.encode("ascii"), np.uint8)].mean())
    return 1.0 - len("".join(_NON_ALNUM.findall(text))) / len(text)


def code_quality(batch: TextBatch, cfg: CodeFilterConfig) -> FilterResult:
    markers = [m.lower() for m in cfg.autogenerated_markers]

    def generated(text: str) -> bool:
        head = "\n".join(text.split("\n", cfg.marker_lines)[: cfg.marker_lines]).lower()
        return any(m in head for m in markers)

    stats = {
        "max_line_chars": np.fromiter((max(map(len, lines)) for lines in batch.lines), np.float64, batch.n),
        "mean_line_chars": _safe_div(batch.chars.astype(np.float64), batch.n_lines),
        "alnum_fraction": batch.count(_alnum_fraction),
        "autogenerated": batch.count(generated),
    }
    rules = [
        Rule("code_long_line", "max_line_chars", high=cfg.max_line_chars),
        Rule("code_mean_line_length", "mean_line_chars", high=cfg.max_mean_line_chars),
        Rule("code_low_alnum", "alnum_fraction", low=cfg.min_alnum_fraction),
        Rule("code_autogenerated", "autogenerated", high=0),
    ]
    return apply_rules("code", stats, rules, batch.n)


def run_preset(batch: TextBatch, preset: FilterPreset) -> list[FilterResult]:
    """The enabled filters of a preset, in order: Gopher quality, Gopher repetition, C4, code."""
    filters: list[tuple[Any, Callable[[TextBatch, Any], FilterResult]]] = [
        (preset.gopher_quality, gopher_quality),
        (preset.gopher_repetition, gopher_repetition),
        (preset.c4, c4_lines),
        (preset.code, code_quality),
    ]
    return [fn(batch, cfg) for cfg, fn in filters if cfg.enabled]
