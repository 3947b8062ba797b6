"""Training windows over memory-mapped token shards, in a seeded order with an exact, reshardable resume position.

Each shard is cut into non-overlapping windows of ``block_size + 1`` tokens (inputs and shifted targets).
With an end-of-text id (``train.align: bos``) the grid restarts at every document start, so each document's
first window begins at the document (as nanochat's BOS-aligned rows do) and none straddles a document start.
The sampler turns (seed, epoch) into a permutation of all windows and concatenates the epochs into one
endless stream. Every optimizer micro-step consumes the next ``batch_size * world_size`` windows of the
stream; rank ``r`` takes every ``world_size``-th of them starting at ``r``. The resume state is the one global
stream position (stored as epoch + offset), so the remaining data order does not depend on how many ranks
consumed the first part: a checkpoint can resume on a different number of processes with the same data.

With source weights (``sources[].weight``) a ``MixtureSampler`` draws instead: each window belongs to the source
of its first token (from the tokenize ledger's document spans), every stream position is given to the source
furthest below its target share (largest ``weight * position - drawn``, so shares are exact up to one window at
every prefix), and a source reads its own windows in seeded per-source epochs. A source stops being drawn at its
repeat cap (``max_repeats`` epochs); the others then share its place in proportion to their weights. The resume
state is the stream position plus the windows drawn per source, global as above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch
from numpy.lib.stride_tricks import as_strided

from storage.shards import read_token_shard


@dataclass
class LoaderState:
    epoch: int = 0
    offset: int = 0  # windows of this epoch already consumed by all ranks together (mixtures: of the whole stream)
    consumed: list[int] | None = None  # mixtures: windows drawn so far from each source, in source order


def document_aligned_starts(tokens: np.ndarray, block_size: int, eot: int) -> np.ndarray:
    """Window starts every ``block_size`` tokens from each document's start (the token after an end-of-text)."""
    doc_starts = np.concatenate([[0], np.flatnonzero(tokens[:-1] == eot) + 1]).astype(np.int64)
    per_doc = -(-np.diff(np.append(doc_starts, len(tokens))) // block_size)  # ceil(document length / block_size)
    first = np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
    starts = np.repeat(doc_starts, per_doc) + (np.arange(per_doc.sum()) - first) * block_size
    return starts[starts + block_size + 1 <= len(tokens)]


class TokenWindows:
    """All ``block_size + 1`` windows of a list of token shards, addressable by a global window index."""

    def __init__(self, shard_paths: list[Path], block_size: int, eot: int | None = None):
        self.block_size = block_size
        self.shards = [read_token_shard(p) for p in shard_paths]
        if eot is None:
            counts = [max((len(s) - 1) // block_size, 0) for s in self.shards]
            # a read-only (n_windows, block_size + 1) view of each memory-mapped shard: windows overlap by one token
            self.views = [
                as_strided(s, shape=(n, block_size + 1), strides=(block_size * s.itemsize, s.itemsize), writeable=False)
                for s, n in zip(self.shards, counts, strict=True)
            ]
        else:
            offsets = np.arange(block_size + 1)
            self.views = [AlignedWindows(s, document_aligned_starts(s, block_size, eot), offsets) for s in self.shards]
            counts = [len(v) for v in self.views]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def first_tokens(self, shard: int) -> np.ndarray:
        """Where each window of shard number ``shard`` starts, in tokens from the shard's start."""
        view = self.views[shard]
        if isinstance(view, AlignedWindows):
            return view.window_starts
        return np.arange(len(view), dtype=np.int64) * self.block_size

    def window(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        return self.views[shard][index - int(self.starts[shard])]

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """The windows at ``indices`` as one ``(len(indices), block_size + 1)`` int64 array (a row take per shard)."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"window index out of range [0, {len(self)})")
        out = np.empty((len(indices), self.block_size + 1), dtype=np.int64)
        if len(self.views) == 1:
            out[:] = self.views[0][indices]
            return out
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        for shard in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == shard)
            out[rows] = self.views[shard][indices[rows] - self.starts[shard]]
        return out

    def tensor(self, indices: np.ndarray, pin_memory: bool = False) -> torch.Tensor:
        """The windows at ``indices`` as one ``(B, block_size + 1)`` tensor, optionally in pinned memory."""
        tensor = torch.from_numpy(self.gather(indices))
        return tensor.pin_memory() if pin_memory else tensor

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets ``(B, block_size)`` for the windows at ``indices`` (views of one tensor)."""
        tensor = self.tensor(indices)
        return tensor[:, :-1], tensor[:, 1:]


class AlignedWindows:
    """Windows of one shard at explicit start offsets, indexed like the strided view of the fixed grid."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, offsets: np.ndarray):
        self.tokens, self.window_starts, self.offsets = tokens, starts, offsets

    def __len__(self) -> int:
        return len(self.window_starts)

    def __getitem__(self, rows) -> np.ndarray:
        return self.tokens[self.window_starts[rows][..., None] + self.offsets]


class WindowSampler:
    """Seeded epoch-permutation sampling of window indices for one rank, with a resumable global position."""

    def __init__(self, n_windows: int, seed: int, rank: int = 0, world_size: int = 1, state: LoaderState | None = None):
        if n_windows < 1:
            raise ValueError("no training windows: the train split has fewer than block_size + 1 tokens")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n_windows, self.seed, self.rank, self.world_size = n_windows, seed, rank, world_size
        self.state = state or LoaderState()
        if not 0 <= self.state.offset <= n_windows:
            raise ValueError(
                f"loader position {self.state.offset} is outside an epoch of {n_windows} windows: "
                "the checkpoint was written for different training data"
            )
        self._orders: dict[int, np.ndarray] = {}

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return self._orders[epoch]

    def next(self, batch_size: int) -> np.ndarray:
        """This rank's next ``batch_size`` window indices; advances the global position by ``batch_size * world``."""
        n, first = self.n_windows, self.state.epoch * self.n_windows + self.state.offset
        stream = first + self.rank + self.world_size * np.arange(batch_size, dtype=np.int64)
        epochs, positions = np.divmod(stream, n)
        out = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._epoch_order(int(epoch))[positions[mask]]
        self.state.epoch, self.state.offset = divmod(first + batch_size * self.world_size, n)
        return out


def window_sources(
    windows: TokenWindows, shard_paths: list[Path], ledger_files: list[Path], sources: list[str]
) -> np.ndarray:
    """The source index (in ``sources``) of every window: the source of the document holding its first token."""
    table = ds.dataset([str(f) for f in ledger_files], format="parquet").to_table(
        columns=["source", "shard", "token_start"], filter=pc.field("split") == "train"
    )
    out = np.full(len(windows), -1, dtype=np.int64)
    index = {name: i for i, name in enumerate(sources)}
    for k, path in enumerate(shard_paths):
        rows = table.filter(pc.equal(table["shard"], Path(path).stem))
        order = np.argsort(rows["token_start"].to_numpy())
        starts = rows["token_start"].to_numpy()[order]
        owner = np.array([index.get(s, -1) for s in rows["source"].to_pylist()], dtype=np.int64)[order]
        first_tokens = windows.first_tokens(k)
        if len(first_tokens):
            at = np.searchsorted(starts, first_tokens, side="right") - 1
            out[windows.starts[k] : windows.starts[k + 1]] = owner[np.maximum(at, 0)]
    return out


class MixtureSampler:
    """Window indices drawn to target source shares, deterministic and resumable like ``WindowSampler``."""

    def __init__(
        self,
        source_of_window: np.ndarray,
        sources: list[str],
        weights: list[float],
        max_repeats: list[float | None],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        state: LoaderState | None = None,
    ):
        self.sources, self.seed, self.rank, self.world_size = sources, seed, rank, world_size
        self.pools = [np.flatnonzero(source_of_window == i) for i in range(len(sources))]
        empty = [name for name, pool, w in zip(sources, self.pools, weights, strict=True) if w > 0 and not len(pool)]
        if empty:
            raise ValueError(f"sources {empty} have a weight but no training window: remove their weight")
        total = float(sum(weights))
        self.weights = np.array(weights, dtype=np.float64) / total
        self.caps = np.array(
            [math.inf if r is None else math.floor(r * len(p)) for r, p in zip(max_repeats, self.pools, strict=True)]
        )
        self.state = state or LoaderState()
        if self.state.consumed is None:
            self.state.consumed = [0] * len(sources)
        if len(self.state.consumed) != len(sources):
            raise ValueError("the checkpoint's loader position was written for other sources")
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def schedule(self, first: int, count: int, drawn: np.ndarray) -> np.ndarray:
        """The source of each stream position in ``[first, first + count)``; advances ``drawn`` (per source)."""
        out = np.empty(count, dtype=np.int64)
        live = (self.weights > 0) & (drawn < self.caps)
        for j in range(count):
            if not live.any():
                raise ValueError(
                    f"every weighted source reached its repeat cap after {first + j:,} windows: "
                    "raise sources[].max_repeats or lower the training budget"
                )
            deficit = np.where(live, self.weights * (first + j + 1) - drawn, -np.inf)
            s = int(np.argmax(deficit))
            out[j] = s
            drawn[s] += 1
            live[s] = drawn[s] < self.caps[s]
        return out

    def _window(self, source: int, k: int) -> int:
        pool = self.pools[source]
        epoch, pos = divmod(k, len(pool))
        key = (source, epoch)
        if key not in self._orders:
            self._orders = {kk: o for kk, o in self._orders.items() if kk[0] != source or kk[1] >= epoch - 1}
            self._orders[key] = np.random.default_rng([self.seed, source, epoch]).permutation(len(pool))
        return int(pool[self._orders[key][pos]])

    def next(self, batch_size: int) -> np.ndarray:
        """This rank's next ``batch_size`` window indices (every rank computes the same global stream)."""
        first, n = self.state.offset, batch_size * self.world_size
        drawn = np.array(self.state.consumed, dtype=np.int64)
        before = drawn.copy()
        chosen = self.schedule(first, n, drawn)
        # the k-th window of source s in this block is that source's window number before[s] + (its rank in block)
        rank_in_block = np.zeros(n, dtype=np.int64)
        seen = np.zeros(len(self.sources), dtype=np.int64)
        for j, s in enumerate(chosen):
            rank_in_block[j] = seen[s]
            seen[s] += 1
        mine = self.rank + self.world_size * np.arange(batch_size)
        out = np.array([self._window(int(chosen[j]), int(before[chosen[j]] + rank_in_block[j])) for j in mine])
        self.state.offset, self.state.consumed = first + n, drawn.tolist()
        return out.astype(np.int64)

    def drawn_after(self, positions: int) -> dict[str, int]:
        """Windows each source contributes to the first ``positions`` of the stream (what a run trained on)."""
        drawn = np.zeros(len(self.sources), dtype=np.int64)
        self.schedule(0, positions, drawn)
        return dict(zip(self.sources, drawn.tolist(), strict=True))


@dataclass(frozen=True)
class Mixture:
    """Source weights and repeat caps for the train loader, with the tokenize ledger that places the windows."""

    sources: list[str]
    weights: list[float]
    max_repeats: list[float | None]
    ledger_files: list[str]

    def sampler(
        self, windows: TokenWindows, shard_paths: list[Path], seed: int, rank: int, world: int, state: LoaderState
    ) -> MixtureSampler:
        owners = window_sources(windows, shard_paths, [Path(f) for f in self.ledger_files], self.sources)
        return MixtureSampler(owners, self.sources, self.weights, self.max_repeats, seed, rank, world, state)


def make_sampler(
    windows: TokenWindows,
    shard_paths: list[Path],
    mixture: dict | None,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    state: LoaderState | None = None,
) -> WindowSampler | MixtureSampler:
    """The loader's sampler: a plain seeded permutation, or a mixture when source weights are configured."""
    if not mixture:
        return WindowSampler(len(windows), seed, rank, world_size, state=state)
    return Mixture(**mixture).sampler(windows, shard_paths, seed, rank, world_size, state or LoaderState())
