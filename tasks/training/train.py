"""Train: a decoder-only Transformer on the train token shards, with atomic checkpoints and exact resume.

``train`` is the stage function. With ``train.nproc > 1`` it hands the job to ``torchrun``
(``tasks.training.launch``); every process then runs ``tasks.training.loop.run_training``. Checkpoints
(``tasks.training.checkpoints``) make a retried task continue bit-identically on CPU. The published artifact holds
``model.safetensors``, ``model.json``, ``train_log.jsonl`` and ``loss_curve.png`` — deterministic content
only; throughput, MFU and memory go to the counts and ``telemetry.jsonl`` in the work folder.
"""

from __future__ import annotations

from pathlib import Path

from storage.artifacts import StageContext
from tasks.config import ModelConfig, TrainConfig
from tasks.training.distributed import DistEnv
from tasks.training.job import TrainJob
from tasks.training.loader import TokenWindows, make_sampler
from tasks.training.loop import run_training
from tasks.training.validation import require_val_windows

VERSION = "2"


def train(
    train_shards: list[Path],
    val_shards: list[Path],
    vocab_size: int,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    seed: int,
    ctx: StageContext,
    mixture: dict | None = None,
    eot_id: int | None = None,
) -> dict:
    """The train stage: in this process, or under ``torchrun`` when ``cfg.nproc > 1`` or ``cfg.nnodes > 1``.

    ``mixture`` (source weights, repeat caps, the tokenize ledger) makes the loader draw to target source shares;
    the counts then say how many tokens each source contributed (``tokens_per_source``). ``eot_id`` (the
    end-of-text token) is needed only for document-aligned windows (``train.align: bos``).
    """
    require_val_windows(val_shards, model_cfg.block_size)  # before any process starts or any step runs
    job = TrainJob.build(train_shards, val_shards, vocab_size, model_cfg, cfg, seed, mixture, eot_id)
    if cfg.nproc > 1 or cfg.nnodes > 1:
        from tasks.training.launch import launch_distributed

        counts = launch_distributed(job, ctx)
    else:
        counts = run_training(job, ctx, DistEnv())
    return counts | realized_mixture(job, counts) if mixture else counts


def realized_mixture(job: TrainJob, counts: dict) -> dict:
    """Tokens each source contributed to the optimizer steps taken (the stream is replayed, not logged)."""
    block = job.model["block_size"]
    windows = TokenWindows([Path(p) for p in job.train_shards], block, job.align_eot)
    sampler = make_sampler(windows, [Path(p) for p in job.train_shards], job.mixture, job.seed)
    drawn = sampler.drawn_after(counts["tokens_trained"] // block)
    total = sum(drawn.values()) or 1
    return {
        "tokens_per_source": {s: n * block for s, n in drawn.items()},
        "share_per_source": {s: round(n / total, 4) for s, n in drawn.items()},
        "target_share_per_source": {
            s: round(w / sum(job.mixture["weights"]), 4)
            for s, w in zip(job.mixture["sources"], job.mixture["weights"], strict=True)
        },
    }
