"""Train: a decoder-only Transformer on the train token shards, with atomic checkpoints and exact resume.

``train`` is the stage function. With ``train.nproc > 1`` it hands the job to ``torchrun`` (see
``tasks/launch.py``); every process then runs ``run_training``, which reads top to bottom: pick the device,
build model and optimizer, resume from the newest checkpoint in the stage's work folder if any, then
step → (eval) → (checkpoint) until the step or token budget is spent.

A step accumulates gradients over ``grad_accum`` micro-batches (DDP syncs only on the last), clips the
gradient norm, and steps AdamW under a warmup + cosine schedule; bf16 autocast on CUDA, float32 on CPU. A
checkpoint holds model, optimizer, step, every rank's CPU/CUDA RNG state and the loader position, so a
retried task continues bit-identically on CPU. Only rank 0 writes files. The published artifact holds
``model.safetensors``, ``model.json``, ``train_log.jsonl`` and ``loss_curve.png`` — deterministic content
only; throughput, MFU and memory go to the counts and ``telemetry.jsonl`` in the work folder.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from storage.artifacts import StageContext
from storage.faults import maybe_fail
from tasks import distributed
from tasks.config import ModelConfig, TrainConfig
from tasks.distributed import DistEnv
from tasks.loader import LoaderState, TokenWindows, WindowSampler
from tasks.model import GPT, GPTConfig
from tasks.telemetry import append_jsonl, device_name, mfu, peak_memory_mb, plot_loss_curve

VERSION = "2"
CHECKPOINT_FORMAT = 2
MODEL_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model.json"
LOG_FILE = "train_log.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
TELEMETRY_FILE = "telemetry.jsonl"


class UnrecoverableTrainingError(RuntimeError):
    """A failure that resuming from a checkpoint cannot fix (e.g. out of memory on the first step)."""

    retryable = False


class TrainingSetupError(ValueError):
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

    @classmethod
    def build(
        cls,
        train_shards: list[Path],
        val_shards: list[Path],
        vocab_size: int,
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        seed: int,
    ) -> TrainJob:
        return cls(
            [str(p) for p in train_shards],
            [str(p) for p in val_shards],
            int(vocab_size),
            model_cfg.sizes(),
            cfg.model_dump(),
            seed,
        )

    @property
    def cfg(self) -> TrainConfig:
        return TrainConfig.model_validate(self.train)

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


@dataclass
class RunState:
    """What a checkpoint restores besides tensors: progress, logs and the loader position."""

    step: int = 0
    loader: LoaderState = field(default_factory=LoaderState)
    log_rows: list[dict] = field(default_factory=list)  # deterministic: go into the artifact
    telemetry: list[dict] = field(default_factory=list)  # timing-dependent: counts and work folder only
    train_seconds: float = 0.0


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


def lr_at(step: int, cfg: TrainConfig, total_steps: int | None = None) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * learning_rate`` at the last step."""
    total = cfg.max_steps if total_steps is None else total_steps
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
    floor = cfg.learning_rate * cfg.min_lr_ratio
    return floor + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.learning_rate - floor)


# --- checkpoints ---------------------------------------------------------------------------------------------


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


def clean_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights without ``torch.compile``'s ``_orig_mod.`` or DDP's ``module.`` prefixes."""
    out = {}
    for key, value in model.state_dict().items():
        for prefix in ("_orig_mod.", "module."):
            key = key.replace(prefix, "")
        out[key] = value
    return out


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Clean weights with the tied output head stored once, contiguous on CPU (for safetensors)."""
    state = clean_state_dict(model)
    state.pop("lm_head.weight", None)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore(
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


# --- evaluation ----------------------------------------------------------------------------------------------


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


# --- the loop ------------------------------------------------------------------------------------------------


def train(
    train_shards: list[Path],
    val_shards: list[Path],
    vocab_size: int,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    seed: int,
    ctx: StageContext,
) -> dict:
    """The train stage: in this process, or under ``torchrun`` when ``cfg.nproc > 1`` or ``cfg.nnodes > 1``."""
    job = TrainJob.build(train_shards, val_shards, vocab_size, model_cfg, cfg, seed)
    if cfg.nproc > 1 or cfg.nnodes > 1:
        from tasks.launch import launch_distributed

        return launch_distributed(job, ctx)
    return run_training(job, ctx, DistEnv())


def run_training(job: TrainJob, ctx: StageContext, env: DistEnv) -> dict:
    """Train until the step or token budget is spent; returns the stage counts (on every rank)."""
    cfg = job.cfg
    device = pick_device(cfg.device, env.local_rank)
    configure_backends(device, cfg.threads)
    distributed.init_process_group(env, device.type)
    gpt_cfg = GPTConfig(vocab_size=job.vocab_size, **job.model)
    plan = StepPlan.of(cfg, gpt_cfg.block_size, env.world_size)
    torch.manual_seed(job.seed)
    model = GPT(gpt_cfg).to(device)
    optimizer = model.optimizer(cfg.learning_rate, cfg.weight_decay, device.type)
    train_windows = TokenWindows([Path(p) for p in job.train_shards], gpt_cfg.block_size)
    val_windows = TokenWindows([Path(p) for p in job.val_shards], gpt_cfg.block_size)
    if len(train_windows) < cfg.batch_size * env.world_size:
        raise TrainingSetupError(
            f"only {len(train_windows)} training windows of {gpt_cfg.block_size + 1} tokens for a micro-batch of "
            f"{cfg.batch_size} x {env.world_size} processes: add data or lower block_size / batch_size"
        )
    ckpt_dir = ctx.work_dir / "checkpoints"
    ckpt = load_latest_checkpoint(ckpt_dir)
    torch.manual_seed(job.seed + env.rank)  # per-rank dropout noise; rank 0 matches a single process
    run = RunState() if ckpt is None else _restore(ckpt, model, optimizer, plan, env, job.seed, device)
    resumed_from = run.step
    if ckpt is not None and env.is_main:
        ctx.log(f"train: resumed from checkpoint at step {run.step} (epoch {run.loader.epoch})")
    del ckpt
    sampler = WindowSampler(len(train_windows), job.seed, env.rank, env.world_size, state=run.loader)

    step_model: torch.nn.Module = torch.compile(model) if cfg.compile else model
    if env.distributed:
        step_model = DistributedDataParallel(step_model, device_ids=[env.local_rank] if device.type == "cuda" else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    pin = device.type == "cuda"
    flops_per_token = model.flops_per_token()
    eval_windows = cfg.eval_batches * cfg.batch_size
    telemetry_path = ctx.work_dir / TELEMETRY_FILE
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    if env.is_main:
        ctx.log(
            f"train: {model.num_params():,} params on {device_name(device)} x{env.world_size}, "
            f"{plan.tokens_per_step:,} tokens/step ({plan.grad_accum} micro-batches), {plan.total_steps} steps"
        )

    unused_from = [LoaderState()]  # loader position of the prefetched, not yet trained-on batch

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        unused_from[0] = LoaderState(**asdict(sampler.state))
        windows = train_windows.tensor(sampler.next(cfg.batch_size), pin_memory=pin).to(device, non_blocking=True)
        return windows[:, :-1], windows[:, 1:]  # one host-to-device copy; inputs and targets are views

    pending: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []  # losses stay on device until a flush

    def flush() -> None:
        """Move pending step losses to the log (one device sync, one all-reduce for all of them)."""
        if not pending:
            return
        values = torch.stack([torch.stack([loss, norm.float()]) for _, _, loss, norm in pending])
        distributed.all_reduce_mean(values, env)
        for (step_no, lr, _, _), (loss, norm) in zip(pending, values.tolist(), strict=True):
            row = {"step": step_no, "tokens": step_no * plan.tokens_per_step, "lr": lr, "loss": loss}
            run.log_rows.append(row | {"grad_norm": norm})
        pending.clear()

    model.train()
    x, y = next_batch()
    segment_start, segment_tokens = time.perf_counter(), 0
    while run.step < plan.total_steps:
        maybe_fail("train", f"step{run.step}")
        lr = lr_at(run.step, cfg, plan.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        try:
            for micro in range(plan.grad_accum):
                last = micro == plan.grad_accum - 1
                sync = step_model.no_sync() if env.distributed and not last else nullcontext()
                with sync:
                    with autocast:
                        _, loss = step_model(x, y)
                    x, y = next_batch()  # the copy overlaps the backward pass on GPU
                    (loss / plan.grad_accum).backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        except torch.OutOfMemoryError as err:
            if run.step == resumed_from:
                raise UnrecoverableTrainingError(
                    f"out of memory on the first step ({plan.tokens_per_step:,} tokens/step, batch_size "
                    f"{cfg.batch_size}): lower train.batch_size (keep train.batch_tokens to raise grad_accum)"
                ) from err
            raise
        run.step += 1
        segment_tokens += plan.tokens_per_step
        pending.append((run.step, lr, loss_sum / plan.grad_accum, grad_norm))
        at_eval = run.step % cfg.eval_interval == 0 or run.step == plan.total_steps
        at_ckpt = run.step % cfg.checkpoint_interval == 0 and run.step < plan.total_steps
        if not (at_eval or at_ckpt):
            continue
        flush()  # syncs the device, so the segment time below is real
        elapsed = time.perf_counter() - segment_start
        run.train_seconds += elapsed
        if at_eval:
            row = run.log_rows[-1]
            row["val_loss"] = estimate_loss(model, val_windows, eval_windows, cfg.batch_size, device, env, autocast)
            tokens_per_s = segment_tokens / elapsed if elapsed > 0 else 0.0
            metrics = {
                "step": run.step,
                "tokens": row["tokens"],
                "loss": row["loss"],
                "val_loss": row["val_loss"],
                "lr": lr,
                "grad_norm": row["grad_norm"],
                "tokens_per_s": round(tokens_per_s, 1),
                "mfu": mfu(tokens_per_s, flops_per_token, device, env.world_size),
                "peak_mem_mb": round(peak_memory_mb(device), 1),
                "train_seconds": round(run.train_seconds, 3),
            }
            run.telemetry.append(metrics)
            if env.is_main:
                append_jsonl(telemetry_path, metrics)
                mfu_text = f"{metrics['mfu']:.1%}" if metrics["mfu"] is not None else "unknown"
                ctx.log(
                    f"train: step {run.step}/{plan.total_steps} loss {row['loss']:.4f} val {row['val_loss']:.4f} "
                    f"lr {lr:.2e} grad-norm {row['grad_norm']:.3f} {tokens_per_s:,.0f} tok/s MFU {mfu_text} "
                    f"peak mem {metrics['peak_mem_mb']:,.0f} MiB"
                )
                ctx.progress(run.step / plan.total_steps, f"step {run.step}: val loss {row['val_loss']:.4f}")
        if at_ckpt:
            _checkpoint(ckpt_dir, model, optimizer, run, unused_from[0], plan, env, device, cfg.keep_checkpoints)
        segment_start, segment_tokens = time.perf_counter(), 0
    flush()
    counts = _finish(model, gpt_cfg, run, resumed_from, plan, env, device, len(train_windows), ctx)
    distributed.barrier(env)
    return counts


def _checkpoint(
    folder, model, optimizer, run: RunState, loader: LoaderState, plan, env: DistEnv, device, keep: int
) -> None:
    rng = distributed.all_gather_objects(_rng_state(device), env)
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


def _finish(model, gpt_cfg, run: RunState, resumed_from, plan, env, device, n_windows, ctx) -> dict:
    """Rank 0 writes the artifact's deterministic files; every rank returns the counts."""
    if env.is_main:
        save_file(state_dict_for_saving(model), str(ctx.out_dir / MODEL_FILE))
        (ctx.out_dir / MODEL_CONFIG_FILE).write_text(json.dumps(gpt_cfg.to_dict(), indent=2, sort_keys=True))
        with open(ctx.out_dir / LOG_FILE, "w") as fh:
            for row in run.log_rows:
                fh.write(json.dumps(row, sort_keys=True) + "\n")
        plot_loss_curve(run.log_rows, ctx.out_dir / LOSS_CURVE_FILE, f"{model.num_params():,}-parameter model")
    final = run.log_rows[-1] if run.log_rows else {}
    last = run.telemetry[-1] if run.telemetry else {}
    return {
        "steps": run.step,
        "resumed_from_step": resumed_from,
        "tokens_trained": run.step * plan.tokens_per_step,
        "tokens_per_step": plan.tokens_per_step,
        "grad_accum": plan.grad_accum,
        "world_size": env.world_size,
        "train_windows": n_windows,
        "params": model.num_params(),
        "flops_per_token": model.flops_per_token(),
        "final_loss": final.get("loss"),
        "final_val_loss": final.get("val_loss"),
        "device": device.type,
        "device_name": device_name(device),
        "train_seconds": round(run.train_seconds, 3),
        "tokens_per_s": round(run.step * plan.tokens_per_step / run.train_seconds, 1) if run.train_seconds else None,
        "mfu": last.get("mfu"),
        "peak_mem_mb": last.get("peak_mem_mb"),
        "telemetry": run.telemetry,
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
