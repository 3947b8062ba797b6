"""Training windows over memory-mapped token shards, in a seeded order with an exact resume position.

Each shard is cut into non-overlapping windows of ``block_size + 1`` tokens (inputs and shifted targets).
An epoch visits every window once in an order drawn from (seed, epoch); rank ``r`` of ``world`` takes every
``world``-th window of that order. ``state()`` = (epoch, offset) resumes exactly where training stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from storage.shards import read_token_shard


@dataclass
class LoaderState:
    epoch: int = 0
    offset: int = 0  # windows already consumed by this rank in this epoch
    world_size: int = 1


class TokenWindows:
    """All ``block_size + 1`` windows of a list of token shards, addressable by a global window index."""

    def __init__(self, shard_paths: list[Path], block_size: int):
        self.block_size = block_size
        self.shards = [read_token_shard(p) for p in shard_paths]
        counts = [max((len(s) - 1) // block_size, 0) for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def window(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        offset = (index - int(self.starts[shard])) * self.block_size
        return self.shards[shard][offset : offset + self.block_size + 1]

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        data = np.stack([self.window(int(i)) for i in indices]).astype(np.int64)
        tensor = torch.from_numpy(data)
        return tensor[:, :-1], tensor[:, 1:]


class WindowSampler:
    """Seeded epoch-permutation sampling of window indices for one rank, with resumable state."""

    def __init__(self, n_windows: int, seed: int, rank: int = 0, world_size: int = 1, state: LoaderState | None = None):
        if n_windows < world_size:
            raise ValueError(f"only {n_windows} training windows for {world_size} ranks: add data or lower block_size")
        self.n_windows, self.seed, self.rank, self.world_size = n_windows, seed, rank, world_size
        self.state = state or LoaderState(world_size=world_size)
        if self.state.world_size != world_size:
            raise ValueError(
                f"checkpoint was written with world size {self.state.world_size}, now {world_size}: the data "
                "position cannot be resharded; resume with the same number of processes"
            )
        self._order = self._epoch_order(self.state.epoch)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(self.n_windows)[self.rank :: self.world_size]

    def next(self, batch_size: int) -> np.ndarray:
        out = []
        while len(out) < batch_size:
            if self.state.offset >= len(self._order):
                self.state.epoch += 1
                self.state.offset = 0
                self._order = self._epoch_order(self.state.epoch)
            take = min(batch_size - len(out), len(self._order) - self.state.offset)
            out.extend(self._order[self.state.offset : self.state.offset + take])
            self.state.offset += take
        return np.asarray(out, dtype=np.int64)
