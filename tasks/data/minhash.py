"""MinHash LSH primitives, vectorized with NumPy over batches of documents.

A document becomes a set of word n-gram hashes ("shingles") after a dedup normalization that folds case,
punctuation, whitespace and (unless ``fold_numbers`` is off) every digit run to ``0``; its signature holds, per
permutation, the minimum of a multiply-shift hash ``((a*x + b) mod 2^64) >> 32`` over its shingles; LSH cuts
the signature into ``bands`` bands of ``rows`` rows and hashes each band to one 64-bit value. Two documents
with Jaccard similarity ``s`` share at least one band with probability ``1 - (1 - s^rows)^bands`` (the
S-curve), which is ~50% at ``(1/bands)^(1/rows)``.

Everything here is a pure function of (texts, parameters), imports only NumPy and xxhash (so worker
processes start fast), and is deterministic across runs and machines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import xxhash

NORMALIZATION_VERSION = "1"

_DIGITS = re.compile(r"\d+")
_PUNCT = re.compile(r"[^\w\s]|_")
# The same folding for pure-ASCII text through str.translate, which is several times faster than a regex.
_ASCII_PUNCT = str.maketrans({c: " " for c in map(chr, range(128)) if not (c.isalnum() or c.isspace())})


def _split_words(text: str) -> list[str]:
    """Lowercase, turn punctuation into spaces and split on whitespace (digits are folded per word later)."""
    text = text.lower()
    if text.isascii():
        return text.translate(_ASCII_PUNCT).split()
    return _PUNCT.sub(" ", text).split()


def _fold_digits(word: str) -> str:
    return _DIGITS.sub("0", word)


def dedup_words(text: str, fold_numbers: bool = True) -> list[str]:
    """Words as near-dup detection sees them: lowercased, punctuation → space, each digit run → '0' (unless
    ``fold_numbers`` is off: then tables and problems that differ only in their numbers stay apart)."""
    words = _split_words(text)
    return [_fold_digits(w) for w in words] if fold_numbers else words


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijective avalanche of uint64 values (vectorized, wraps mod 2^64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@dataclass(frozen=True)
class MinHashParams:
    """Shingle size, signature length and LSH banding; ``bands * rows <= permutations``.

    No defaults here: ``DedupConfig`` holds the one set, and ``tasks.data.dedup.schema.minhash_params`` builds this.
    """

    ngram: int
    permutations: int
    bands: int
    rows: int
    seed: int = 0
    fold_numbers: bool = True

    def __post_init__(self) -> None:
        if self.ngram < 1 or self.bands < 1 or self.rows < 1:
            raise ValueError("ngram, bands and rows must be positive")
        if self.bands * self.rows > self.permutations:
            raise ValueError(f"bands × rows ({self.bands} × {self.rows}) exceeds permutations ({self.permutations})")

    @property
    def threshold(self) -> float:
        """The similarity at which a pair becomes a candidate with probability ~1/2: (1/b)^(1/r)."""
        return (1.0 / self.bands) ** (1.0 / self.rows)

    def candidate_probability(self, similarity: float | np.ndarray) -> float | np.ndarray:
        """The LSH S-curve: P(at least one band identical | Jaccard similarity)."""
        return 1.0 - (1.0 - np.asarray(similarity, dtype=float) ** self.rows) ** self.bands


class MinHasher:
    """Shingles, signatures and band hashes for batches of texts."""

    def __init__(self, params: MinHashParams, chunk_shingles: int = 1 << 11, max_cached_words: int = 1 << 21):
        self.params = params
        self.chunk_shingles = chunk_shingles
        self.max_cached_words = max_cached_words
        rng = np.random.default_rng(np.random.SeedSequence([params.seed, 0x5EED]))
        self._a = (rng.integers(0, 2**63, params.permutations, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
        self._b = rng.integers(0, 2**63, params.permutations, dtype=np.uint64)
        self._gram = rng.integers(0, 2**63, params.ngram, dtype=np.uint64) | np.uint64(1)
        self._band = rng.integers(0, 2**63, params.rows, dtype=np.uint64) | np.uint64(1)
        self._word_hashes: dict[str, int] = {}  # word → hash, shared by batches (words repeat, Zipf)

    # --- shingles ---------------------------------------------------------------------------------------

    def shingles(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Shingle hashes of every text, concatenated, and the offsets of each text's run (len = n+1).

        A text with fewer than ``ngram`` words has one shingle (all its words); a text with no words has none.
        Shingles may repeat within a text (MinHash is indifferent; use ``shingle_set`` for exact Jaccard).
        """
        n = self.params.ngram
        docs = [_split_words(text) for text in texts]
        counts = np.fromiter(map(len, docs), np.int64, len(docs))
        words = [w for doc in docs for w in doc]
        cache = self._word_hashes
        if len(cache) > self.max_cached_words:
            cache.clear()
        seed = self.params.seed
        fold = _fold_digits if self.params.fold_numbers else str
        for w in dict.fromkeys(words).keys() - cache.keys():
            cache[w] = xxhash.xxh3_64_intdigest(fold(w).encode("utf-8", "surrogatepass"), seed)
        flat = np.fromiter(map(cache.__getitem__, words), np.uint64, len(words))
        starts = np.concatenate([[0], np.cumsum(counts)])
        is_long = counts >= n
        n_shingles = np.where(is_long, counts - n + 1, np.minimum(counts, 1))
        offsets = np.concatenate([[0], np.cumsum(n_shingles)]).astype(np.int64)
        out = np.empty(offsets[-1], np.uint64)
        if len(flat) >= n:
            # Every window of n consecutive words in the batch; keep those that stay inside one text.
            windows = len(flat) - n + 1
            acc = flat[:windows] * self._gram[0]
            for k in range(1, n):
                acc += flat[k : k + windows] * self._gram[k]
            text_end = np.repeat(starts[1:], counts)[:windows]
            out[np.repeat(is_long, n_shingles)] = acc[np.arange(windows) + n <= text_end]
        for i in np.flatnonzero(~is_long & (counts > 0)):  # texts shorter than n words: one shingle each
            out[offsets[i]] = (flat[starts[i] : starts[i + 1]] * self._gram[: counts[i]]).sum(dtype=np.uint64)
        return _mix64(out), offsets

    # --- signatures and bands ---------------------------------------------------------------------------

    def signatures(self, shingles: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """MinHash signatures, shape (texts, permutations), uint32. Texts without shingles get all-max rows."""
        n_docs = len(offsets) - 1
        perms = self.params.permutations
        out = np.full((n_docs, perms), np.iinfo(np.uint32).max, dtype=np.uint32)
        a, b = self._a[None, :], self._b[None, :]
        doc = 0
        while doc < n_docs:
            # A chunk of whole documents holding about chunk_shingles shingles (at least one document).
            stop = int(np.searchsorted(offsets, offsets[doc] + self.chunk_shingles, side="right")) - 1
            stop = min(max(stop, doc + 1), n_docs)
            lo, hi = offsets[doc], offsets[stop]
            if hi > lo:
                values = shingles[lo:hi, None] * a
                values += b
                values >>= np.uint64(32)
                local = offsets[doc:stop] - lo
                nonempty = offsets[doc + 1 : stop + 1] > offsets[doc:stop]
                mins = np.minimum.reduceat(values, local[nonempty], axis=0)
                out[doc:stop][nonempty] = mins.astype(np.uint32)
            doc = stop
        return out

    def band_hashes(self, signatures: np.ndarray) -> np.ndarray:
        """One 64-bit hash per band, shape (texts, bands), int64 (the bit pattern of a uint64)."""
        p = self.params
        sig = signatures[:, : p.bands * p.rows].astype(np.uint64).reshape(len(signatures), p.bands, p.rows)
        acc = (sig * self._band).sum(axis=2, dtype=np.uint64) + np.arange(p.bands, dtype=np.uint64)
        return _mix64(acc).view(np.int64)

    def sign(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Band hashes and a has-shingles mask for a batch of texts: the whole signing step in one call."""
        shingles, offsets = self.shingles(texts)
        sigs = self.signatures(shingles, offsets)
        return self.band_hashes(sigs), np.diff(offsets) > 0


def shingle_set(hasher: MinHasher, text: str) -> np.ndarray:
    """The sorted, distinct shingle hashes of one text (for exact Jaccard)."""
    shingles, _ = hasher.shingles([text])
    return np.unique(shingles)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted distinct arrays; two empty sets count as identical."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def s_curve_table(params: MinHashParams, points: tuple[float, ...] = (0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)):
    """Rows of (Jaccard similarity, probability of becoming a candidate pair) for the stage report."""
    return [
        {"similarity": s, "candidate_probability": round(float(params.candidate_probability(s)), 4)} for s in points
    ]
