"""The training loop every training process runs: it reads top to bottom.

Pick the device, build model and optimizer (``tasks.training.optim``), resume from the newest checkpoint in
the stage's work folder if any, then step → (eval) → (checkpoint) until the step or token budget is spent.
A step accumulates gradients over ``grad_accum`` micro-batches (DDP syncs only on the last), clips the
gradient norm, and steps the optimizer under the learning-rate schedule; bf16 autocast on CUDA, float32 on
CPU. Only rank 0 writes files.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from storage.artifacts import StageContext
from storage.faults import maybe_fail
from tasks.modeling.gpt import GPT, GPTConfig
from tasks.modeling.weights import save_model
from tasks.training import distributed
from tasks.training.checkpoints import RunState, load_latest_checkpoint, restore_checkpoint, write_checkpoint
from tasks.training.distributed import DistEnv
from tasks.training.job import (
    StepPlan,
    TrainingSetupError,
    TrainingStopped,
    TrainJob,
    UnrecoverableTrainingError,
    configure_backends,
    pick_device,
)
from tasks.training.loader import LoaderState, TokenWindows, make_sampler
from tasks.training.optim import build_optimizer
from tasks.training.schedule import lr_at
from tasks.training.telemetry import append_jsonl, device_name, mfu, peak_memory_mb, plot_loss_curve
from tasks.training.validation import estimate_loss

LOG_FILE = "train_log.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
TELEMETRY_FILE = "telemetry.jsonl"
PROGRESS_EVERY_S = 2.0  # seconds between progress reports from inside an eval interval


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
    optimizer = build_optimizer(model, cfg, device.type)
    train_windows = TokenWindows([Path(p) for p in job.train_shards], gpt_cfg.block_size, job.align_eot)
    val_windows = TokenWindows([Path(p) for p in job.val_shards], gpt_cfg.block_size)
    if len(train_windows) < cfg.batch_size * env.world_size:
        raise TrainingSetupError(
            f"only {len(train_windows)} training windows of {gpt_cfg.block_size + 1} tokens for a micro-batch of "
            f"{cfg.batch_size} x {env.world_size} processes: add data or lower block_size / batch_size"
        )
    ckpt_dir = ctx.work_dir / "checkpoints"
    ckpt = load_latest_checkpoint(ckpt_dir)
    torch.manual_seed(job.seed + env.rank)  # per-rank dropout noise; rank 0 matches a single process
    run = RunState() if ckpt is None else restore_checkpoint(ckpt, model, optimizer, plan, env, job.seed, device)
    resumed_from = run.step
    if ckpt is not None and env.is_main:
        ctx.log(f"train: resumed from checkpoint at step {run.step} (epoch {run.loader.epoch})")
    del ckpt
    train_paths = [Path(p) for p in job.train_shards]
    sampler = make_sampler(train_windows, train_paths, job.mixture, job.seed, env.rank, env.world_size, run.loader)

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
    last_progress = segment_start
    while run.step < plan.total_steps:
        maybe_fail("train", f"step{run.step}")
        lr = lr_at(run.step, cfg, plan.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]  # Muon's peak differs from AdamW's; both follow the schedule
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
        if env.is_main and not at_eval and time.perf_counter() - last_progress >= PROGRESS_EVERY_S:
            last_progress = time.perf_counter()  # between evals too: the step and this process's latest loss
            loss_now = (loss_sum / plan.grad_accum).item()
            ctx.progress(run.step / plan.total_steps, f"step {run.step}/{plan.total_steps} loss {loss_now:.4f}")
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
                ctx.progress(
                    run.step / plan.total_steps,
                    f"step {run.step}/{plan.total_steps} loss {row['loss']:.4f} val {row['val_loss']:.4f} "
                    f"{tokens_per_s:,.0f} tok/s",
                )
            if ctx.should_stop(run.step, row["val_loss"]):
                raise TrainingStopped(f"train: stopped at step {run.step} (val loss {row['val_loss']:.4f})")
        if at_ckpt:
            write_checkpoint(ckpt_dir, model, optimizer, run, unused_from[0], plan, env, device, cfg.keep_checkpoints)
        segment_start, segment_tokens = time.perf_counter(), 0
    flush()
    counts = _finish(model, gpt_cfg, run, resumed_from, plan, env, device, len(train_windows), ctx)
    distributed.barrier(env)
    return counts


def _finish(model, gpt_cfg, run: RunState, resumed_from, plan, env, device, n_windows, ctx) -> dict:
    """Rank 0 writes the artifact's deterministic files; every rank returns the counts."""
    if env.is_main:
        save_model(model, gpt_cfg, ctx.out_dir)
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
