"""Validation loss during training: a fixed subset of val windows, identical at every evaluation."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from tasks.modeling.gpt import GPT
from tasks.training import distributed
from tasks.training.distributed import DistEnv
from tasks.training.loader import TokenWindows


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
    return float(total[0] / total[1].clamp(min=1))
