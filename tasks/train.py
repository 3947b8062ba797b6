"""Train: a decoder-only Transformer on the train token shards, with atomic checkpoints and exact resume.

The loop reads top to bottom: pick the device, build model and optimizer, resume from the newest checkpoint
in the stage's work folder if any, then step → (eval) → (checkpoint) until the step budget is spent. A
checkpoint holds model, optimizer, step, RNG states and the loader position, so a retried task continues
bit-identically. The published artifact holds ``model.safetensors``, ``model.json`` and ``train_log.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import save_file

from storage.artifacts import StageContext
from storage.faults import maybe_fail
from tasks.config import ModelConfig, TrainConfig
from tasks.loader import LoaderState, TokenWindows, WindowSampler
from tasks.model import GPT, GPTConfig

VERSION = "1"
MODEL_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model.json"
LOG_FILE = "train_log.jsonl"


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * learning_rate`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
    floor = cfg.learning_rate * cfg.min_lr_ratio
    return floor + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.learning_rate - floor)


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
    found = _checkpoints(folder)
    return torch.load(found[-1], map_location="cpu", weights_only=True) if found else None


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Model weights without ``torch.compile``'s ``_orig_mod.`` prefix, tied weights stored once."""
    state = {k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()}
    state.pop("lm_head.weight", None)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


@torch.no_grad()
def estimate_loss(model: GPT, windows: TokenWindows, n_windows: int, batch_size: int, device: torch.device) -> float:
    """Mean loss over the first ``n_windows`` windows: a fixed subset, identical at every evaluation."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, min(n_windows, len(windows)), batch_size):
        x, y = windows.batch(torch.arange(start, min(start + batch_size, n_windows, len(windows))).numpy())
        _, loss = model(x.to(device), y.to(device))
        total += loss.item() * x.size(0)
        count += x.size(0)
    model.train()
    return total / max(count, 1)


def train(
    train_shards: list[Path],
    val_shards: list[Path],
    vocab_size: int,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    seed: int,
    ctx: StageContext,
) -> dict:
    """Train until ``cfg.max_steps`` optimizer steps, resuming from ``ctx.work_dir`` checkpoints."""
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    gpt_cfg = GPTConfig(vocab_size=vocab_size, **model_cfg.model_dump())
    model = GPT(gpt_cfg).to(device)
    optimizer = model.optimizer(cfg.learning_rate, cfg.weight_decay, device.type)
    train_windows = TokenWindows(train_shards, gpt_cfg.block_size)
    val_windows = TokenWindows(val_shards, gpt_cfg.block_size)
    ckpt_dir = ctx.work_dir / "checkpoints"
    log_rows: list[dict] = []
    step, loader_state = 0, LoaderState()
    resumed = load_latest_checkpoint(ckpt_dir)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        torch.set_rng_state(resumed["cpu_rng"])
        if device.type == "cuda" and "cuda_rng" in resumed:
            torch.cuda.set_rng_state(resumed["cuda_rng"])
        step = int(resumed["step"])
        loader_state = LoaderState(**resumed["loader"])
        log_rows = json.loads(resumed["log"])
        ctx.log(f"train: resumed from checkpoint at step {step}")
    sampler = WindowSampler(len(train_windows), seed, state=loader_state)
    compiled = torch.compile(model) if cfg.compile else model
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    tokens_per_step = cfg.batch_size * cfg.grad_accum * gpt_cfg.block_size
    eval_windows = cfg.eval_batches * cfg.batch_size
    started, tokens_seen = time.perf_counter(), 0
    model.train()
    while step < cfg.max_steps:
        maybe_fail("train", f"step{step}")
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for _ in range(cfg.grad_accum):
            x, y = train_windows.batch(sampler.next(cfg.batch_size))
            with autocast:
                _, loss = compiled(x.to(device), y.to(device))
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        ).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        row = {"step": step, "loss": loss_sum / cfg.grad_accum, "lr": lr, "grad_norm": grad_norm}
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            row["val_loss"] = estimate_loss(model, val_windows, eval_windows, cfg.batch_size, device)
            elapsed = time.perf_counter() - started
            ctx.log(
                f"train: step {step}/{cfg.max_steps} loss {row['loss']:.4f} val {row['val_loss']:.4f} "
                f"lr {lr:.2e} grad-norm {grad_norm:.3f} {tokens_seen / elapsed:,.0f} tok/s"
            )
            ctx.progress(step / cfg.max_steps, f"step {step}: val loss {row['val_loss']:.4f}")
        log_rows.append(row)
        if step % cfg.checkpoint_interval == 0 and step < cfg.max_steps:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "cpu_rng": torch.get_rng_state(),
                "loader": vars(sampler.state).copy(),
                "log": json.dumps(log_rows),
            }
            if device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state()
            save_checkpoint(ckpt_dir, state, cfg.keep_checkpoints)
    elapsed = time.perf_counter() - started
    save_file(state_dict_for_saving(model), str(ctx.out_dir / MODEL_FILE))
    (ctx.out_dir / MODEL_CONFIG_FILE).write_text(json.dumps(gpt_cfg.to_dict(), indent=2, sort_keys=True))
    with open(ctx.out_dir / LOG_FILE, "w") as fh:
        for row in log_rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
    final = log_rows[-1] if log_rows else {}
    return {
        "steps": step,
        "resumed_from_step": int(resumed["step"]) if resumed is not None else 0,
        "tokens_trained": step * tokens_per_step,
        "train_windows": len(train_windows),
        "params": model.num_params(),
        "final_loss": final.get("loss"),
        "final_val_loss": final.get("val_loss"),
        "device": device.type,
        "tokens_per_s_this_attempt": round(tokens_seen / elapsed, 1) if elapsed > 0 else None,
    }


def load_model(folder: Path, device: torch.device | str = "cpu") -> GPT:
    """Load a trained model artifact (safetensors weights, JSON config)."""
    from safetensors.torch import load_file

    cfg = GPTConfig(**json.loads((folder / MODEL_CONFIG_FILE).read_text()))
    model = GPT(cfg)
    state = load_file(str(folder / MODEL_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"{folder}: weights do not match model.json (missing {missing}, unexpected {unexpected})")
    return model.to(device).eval()
