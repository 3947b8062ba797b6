"""The learning-rate schedules, as pure functions of the step (so a resumed run continues on the same curve)."""

from __future__ import annotations

import math

from tasks.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig, total_steps: int | None = None) -> float:
    """Linear warmup to ``learning_rate``, then ``cfg.schedule`` down to ``min_lr_ratio * learning_rate``.

    ``cosine``: half a cosine over every step after warmup. ``wsd`` (warmup-stable-decay): the peak rate
    until the last ``decay_fraction`` of the steps, then a straight line that reaches the floor at the last step.
    """
    total = cfg.max_steps if total_steps is None else total_steps
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    floor = cfg.learning_rate * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_steps = max(round(cfg.decay_fraction * total), 1)
        remaining = (total - 1 - step) / decay_steps  # 1 where the decay starts, 0 at the last step
        return cfg.learning_rate if remaining >= 1 else floor + (cfg.learning_rate - floor) * remaining
    progress = (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
    return floor + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.learning_rate - floor)
