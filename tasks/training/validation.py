"""Validation loss during training: a fixed subset of val windows, identical at every evaluation."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from storage.shards import read_token_shard
from tasks.modeling.gpt import GPT
from tasks.training import distributed
from tasks.training.distributed import DistEnv
from tasks.training.job import TrainingSetupError
from tasks.training.loader import TokenWindows


def require_val_windows(val_shards: list[Path], block_size: int) -> int:
    """The number of validation windows; none is a setup error before training, never a val_loss of 0.0."""
    n = len(TokenWindows(val_shards, block_size))
    if n == 0:
        tokens = sum(len(read_token_shard(p)) for p in val_shards)
        raise TrainingSetupError(
            f"the validation split has {tokens} tokens ({len(val_shards)} shard{'' if len(val_shards) == 1 else 's'}), "
            "fewer than one window of "
            f"model.block_size + 1 = {block_size + 1} tokens, so there is no validation loss to measure: add "
            "documents, raise tokenize.val_fraction, or lower model.block_size"
        )
    return n


@torch.no_grad()
def estimate_loss(
    model: GPT,
    windows: TokenWindows,
    n_windows: int,
    batch_size: int,
    device: torch.device,
    env: DistEnv = DistEnv(),
    autocast=None,
) -> float:
    """Mean loss over the first ``n_windows`` windows: a fixed subset, identical at every evaluation.

    Under DDP each rank evaluates every ``world_size``-th batch and the sums are all-reduced.
    """
    model.eval()
    n = min(n_windows, len(windows))
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(env.rank * batch_size, n, batch_size * env.world_size):
        x, y = windows.batch(torch.arange(start, min(start + batch_size, n)).numpy())
        with autocast or nullcontext():
            _, loss = model(x.to(device), y.to(device))
        total[0] += loss.double() * x.size(0)
        total[1] += x.size(0)
    distributed.all_reduce_sum(total, env)
    model.train()
    if total[1] == 0:  # every rank sees the same count: they all raise
        raise TrainingSetupError("no validation windows to estimate the loss on (see require_val_windows)")
    return float(total[0] / total[1])
