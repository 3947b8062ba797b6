"""A training job: what every training process needs (JSON for torchrun workers), its batch plan and device."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tasks.config import ModelConfig, TrainConfig
from tasks.errors import NotRetryable, UserError


class UnrecoverableTrainingError(NotRetryable, RuntimeError):
    """A failure that resuming from a checkpoint cannot fix (e.g. out of memory on the first step)."""

    retryable = False  # read by the torchrun workers' error files


class TrainingStopped(NotRetryable, RuntimeError):
    """The caller's ``should_stop`` ended the run early (e.g. a pruned sweep trial): nothing is published."""


class TrainingSetupError(UserError):
    """The configuration, data or checkpoint do not fit together; retrying will not help."""

    retryable = False


@dataclass
class TrainJob:
    """Everything a training process needs, JSON-serializable so ``torchrun`` workers can read it."""

    train_shards: list[str]
    val_shards: list[str]
    vocab_size: int
    model: dict
    train: dict
    seed: int
    mixture: dict | None = None  # source weights for the loader (tasks.training.loader.Mixture fields)
    eot_id: int | None = None  # the end-of-text token: where documents start, for train.align "bos"

    @classmethod
    def build(
        cls,
        train_shards: list[Path],
        val_shards: list[Path],
        vocab_size: int,
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        seed: int,
        mixture: dict | None = None,
        eot_id: int | None = None,
    ) -> TrainJob:
        return cls(
            [str(p) for p in train_shards],
            [str(p) for p in val_shards],
            int(vocab_size),
            model_cfg.sizes(),
            cfg.model_dump(),
            seed,
            mixture,
            eot_id,
        )

    @property
    def cfg(self) -> TrainConfig:
        return TrainConfig.model_validate(self.train)

    @property
    def align_eot(self) -> int | None:
        """The end-of-text id training windows align to (``train.align: bos``), or None for the fixed grid."""
        if self.cfg.align == "none":
            return None
        if self.eot_id is None:
            raise TrainingSetupError("train.align 'bos' needs the end-of-text token id; the tokenize stage gives it")
        return self.eot_id

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainJob:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class StepPlan:
    """Batch geometry and budget: micro-batches per step, tokens per step (all ranks), total steps."""

    grad_accum: int
    tokens_per_step: int
    total_steps: int

    @classmethod
    def of(cls, cfg: TrainConfig, block_size: int, world_size: int) -> StepPlan:
        micro_tokens = cfg.batch_size * block_size * world_size
        if cfg.batch_tokens is None:
            grad_accum = cfg.grad_accum
        elif cfg.batch_tokens % micro_tokens:
            raise TrainingSetupError(
                f"train.batch_tokens ({cfg.batch_tokens}) must be a multiple of batch_size * block_size * nproc "
                f"= {cfg.batch_size} * {block_size} * {world_size} = {micro_tokens}"
            )
        else:
            grad_accum = cfg.batch_tokens // micro_tokens
        tokens_per_step = grad_accum * micro_tokens
        steps = cfg.max_steps if cfg.max_tokens is None else math.ceil(cfg.max_tokens / tokens_per_step)
        return cls(grad_accum, tokens_per_step, steps)


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise TrainingSetupError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def configure_backends(device: torch.device, threads: int | None) -> None:
    """TF32 matmuls on CUDA (bf16 autocast covers the rest); a fixed CPU thread count if asked."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if threads:
        torch.set_num_threads(threads)
