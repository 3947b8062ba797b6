"""The learning-rate schedule, as a pure function of the step."""

from __future__ import annotations

import math

from tasks.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig, total_steps: int | None = None) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * learning_rate`` at the last step."""
    total = cfg.max_steps if total_steps is None else total_steps
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
    floor = cfg.learning_rate * cfg.min_lr_ratio
    return floor + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.learning_rate - floor)
