"""Training checkpoints: written atomically, holding everything an exact resume needs.

A checkpoint holds model, optimizer, step, every rank's CPU/CUDA RNG state and the loader position; only
rank 0 writes it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tasks.modeling.gpt import GPT
from tasks.modeling.weights import clean_state_dict
from tasks.training import distributed
from tasks.training.distributed import DistEnv
from tasks.training.job import StepPlan, TrainingSetupError
from tasks.training.loader import LoaderState

CHECKPOINT_FORMAT = 2


@dataclass
class RunState:
    """What a checkpoint restores besides tensors: progress, logs and the loader position."""

    step: int = 0
    loader: LoaderState = field(default_factory=LoaderState)
    log_rows: list[dict] = field(default_factory=list)  # deterministic: go into the artifact
    telemetry: list[dict] = field(default_factory=list)  # timing-dependent: counts and work folder only
    train_seconds: float = 0.0


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("ckpt-*.pt"))


def save_checkpoint(folder: Path, state: dict, keep: int) -> Path:
    """Write ``ckpt-<step>.pt`` atomically (temp file, fsync, rename) and keep only the newest ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ckpt-{state['step']:08d}.pt"
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    for old in _checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(folder: Path) -> dict | None:
    """The newest checkpoint, loaded with ``weights_only=True`` (plain tensors and containers only)."""
    found = _checkpoints(folder)
    return torch.load(found[-1], map_location="cpu", weights_only=True) if found else None


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_checkpoint(
    ckpt: dict, model: GPT, optimizer: torch.optim.Optimizer, plan: StepPlan, env: DistEnv, seed: int, device
) -> RunState:
    """Load a checkpoint into model and optimizer; refuse one whose batch geometry differs from this run's."""
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainingSetupError(f"checkpoint format {ckpt.get('format')} is not {CHECKPOINT_FORMAT}; delete it")
    if ckpt["tokens_per_step"] != plan.tokens_per_step:
        raise TrainingSetupError(
            f"the checkpoint was written with {ckpt['tokens_per_step']} tokens per step, this run has "
            f"{plan.tokens_per_step} (batch_size * block_size * nproc * grad_accum): resume with the same global "
            "batch — set train.batch_tokens to keep it fixed across process counts"
        )
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    rng = ckpt["rng"]
    if len(rng) == env.world_size:
        torch.set_rng_state(rng[env.rank]["cpu"])
        if device.type == "cuda" and "cuda" in rng[env.rank]:
            torch.cuda.set_rng_state(rng[env.rank]["cuda"], device)
    else:  # a different process count: the data position reshards exactly; dropout noise is reseeded
        torch.manual_seed(seed + 1_000_003 * int(ckpt["step"]) + env.rank)
    return RunState(
        step=int(ckpt["step"]),
        loader=LoaderState(**ckpt["loader"]),
        log_rows=json.loads(ckpt["log"]),
        telemetry=json.loads(ckpt["telemetry"]),
        train_seconds=float(ckpt["train_seconds"]),
    )


def write_checkpoint(
    folder, model, optimizer, run: RunState, loader: LoaderState, plan, env: DistEnv, device, keep: int
) -> None:
    rng = distributed.all_gather_objects(rng_state(device), env)
    if env.is_main:
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": clean_state_dict(model),
            "optimizer": optimizer.state_dict(),
            "step": run.step,
            "tokens_per_step": plan.tokens_per_step,
            "world_size": env.world_size,
            "rng": rng,
            "loader": asdict(loader),
            "log": json.dumps(run.log_rows),
            "telemetry": json.dumps(run.telemetry),
            "train_seconds": run.train_seconds,
        }
        save_checkpoint(folder, state, keep)
    distributed.barrier(env)
