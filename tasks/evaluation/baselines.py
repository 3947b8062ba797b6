"""Trivial language models fitted on the train split, scored on the very tokens the Transformer is scored on.

* ``Unigram``: add-one smoothed token frequencies (ignores context entirely).
* ``KneserNeyBigram``: interpolated Kneser-Ney over token pairs, one absolute discount ``D = n1 / (n1 + 2 n2)``
  (Ney et al.), backing off to a continuation unigram that is itself interpolated with the uniform
  distribution, so every token has non-zero probability.

Both are NumPy only: pair counts are kept sparse (sorted ``prev * V + next`` keys), so a 50k vocabulary
costs memory in the number of distinct pairs, not V².
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from storage.shards import read_token_shard


class Unigram:
    name = "unigram"

    def __init__(self, train_shards: list[Path], vocab_size: int):
        counts = np.ones(vocab_size, dtype=np.float64)
        for path in train_shards:
            counts += np.bincount(read_token_shard(path), minlength=vocab_size)[:vocab_size]
        self.log_p = np.log(counts / counts.sum())
        self.description = "add-one smoothed token frequencies of the train split"

    def log_prob(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """log p(next | prev) for aligned arrays of token ids (prev is ignored)."""
        return self.log_p[nxt]

    def argmax_next(self, prev: np.ndarray) -> np.ndarray:
        return np.full(len(prev), int(self.log_p.argmax()), dtype=np.int64)


class KneserNeyBigram:
    name = "bigram"

    def __init__(self, train_shards: list[Path], vocab_size: int):
        V = self.vocab_size = vocab_size
        keys = [t[:-1].astype(np.int64) * V + t[1:] for t in map(read_token_shard, train_shards) if len(t) > 1]
        self.keys, counts = np.unique(np.concatenate(keys) if keys else np.zeros(0, np.int64), return_counts=True)
        self.counts = counts.astype(np.float64)
        n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
        self.discount = n1 / (n1 + 2 * n2) if n1 + n2 else 0.75
        prev, nxt = self.keys // V, self.keys % V
        self.history = np.bincount(prev, weights=self.counts, minlength=V)  # C(a ·)
        self.followers = np.bincount(prev, minlength=V).astype(np.float64)  # N1+(a ·)
        preceders = np.bincount(nxt, minlength=V).astype(np.float64)  # N1+(· b)
        types = max(len(self.keys), 1)
        D = self.discount
        self.p_cont = (np.maximum(preceders - D, 0) + D * (preceders > 0).sum() / V) / types
        if not len(self.keys):
            self.p_cont = np.full(V, 1.0 / V)
        self._best: dict[int, int] = {}
        self.description = f"interpolated Kneser-Ney bigram of the train split (discount D={D:.3f})"

    def _pair_counts(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        key = prev.astype(np.int64) * self.vocab_size + nxt
        pos = np.minimum(np.searchsorted(self.keys, key), max(len(self.keys) - 1, 0))
        if not len(self.keys):
            return np.zeros(len(key))
        return np.where(self.keys[pos] == key, self.counts[pos], 0.0)

    def log_prob(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """log p(next | prev) for aligned arrays of token ids."""
        D = self.discount
        history = self.history[prev]
        backoff = self.p_cont[nxt]
        seen = (np.maximum(self._pair_counts(prev, nxt) - D, 0) + D * self.followers[prev] * backoff) / np.maximum(
            history, 1
        )
        return np.log(np.where(history > 0, seen, backoff))

    def argmax_next(self, prev: np.ndarray) -> np.ndarray:
        """The most probable next token after each of ``prev`` (dense rows only for the distinct histories)."""
        V, D = self.vocab_size, self.discount
        for a in map(int, np.unique(prev)):
            if a not in self._best:
                lo, hi = np.searchsorted(self.keys, [a * V, (a + 1) * V])
                row = D * self.followers[a] * self.p_cont
                row[self.keys[lo:hi] % V] += np.maximum(self.counts[lo:hi] - D, 0)
                self._best[a] = int(row.argmax()) if self.history[a] > 0 else int(self.p_cont.argmax())
        return np.array([self._best[int(a)] for a in prev], dtype=np.int64)


def fit_baselines(train_shards: list[Path], vocab_size: int) -> list[Unigram | KneserNeyBigram]:
    return [Unigram(train_shards, vocab_size), KneserNeyBigram(train_shards, vocab_size)]
