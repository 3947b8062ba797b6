"""Run a training job on several processes under ``torchrun``, from inside the (Prefect-free) train stage.

``torchrun --standalone`` starts ``nproc`` copies of ``tasks.train_worker`` in its own process group and
session; their output is streamed to ``ctx.log`` and their progress lines to ``ctx.progress``. If anything
goes wrong on this side (an exception, Ctrl-C, a cancelled task) the whole group is terminated, then killed.
A failed run raises with the failing rank's error, keeping whether a retry (= resume) can help.

Note: torchrun's rendezvous store listens on all interfaces; on shared hosts run it in a private network
namespace (the tests use ``unshare -n``) or with ``torch.multiprocessing.spawn`` and a file:// rendezvous.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch

from storage.artifacts import StageContext
from tasks.train import TrainingSetupError, TrainJob, UnrecoverableTrainingError
from tasks.train_worker import JOB_FILE, PATHS_FILE, PROGRESS_PREFIX, RESULT_FILE

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class DistributedTrainingError(RuntimeError):
    """A rank of a torchrun job failed with an error a resume may fix."""


def torchrun_command(job_dir: Path, nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "tasks.train_worker",
        str(job_dir),
    ]


def _worker_env(job: TrainJob) -> dict[str, str]:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    cfg = job.cfg
    if cfg.device == "cpu" or not torch.cuda.is_available():  # share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(cfg.threads or max(1, (os.cpu_count() or 1) // cfg.nproc))
    return env


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the launcher's whole process group, then SIGKILL whatever outlives ``grace_s``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _failure(job_dir: Path, status: int) -> Exception:
    errors = [json.loads(p.read_text()) for p in sorted(job_dir.glob("error-rank*.json"))]
    if not errors:
        return DistributedTrainingError(f"torchrun exited with status {status} and no rank reported an error")
    fatal = [e for e in errors if not e["retryable"]]
    first = (fatal or errors)[0]
    message = f"{first['type']} in a training process: {first['message']}"
    return UnrecoverableTrainingError(message) if fatal else DistributedTrainingError(message)


def launch_distributed(job: TrainJob, ctx: StageContext) -> dict:
    """Train ``job`` on ``job.cfg.nproc`` processes; returns rank 0's counts."""
    nproc = job.cfg.nproc
    if job.cfg.device == "cuda" and torch.cuda.device_count() < nproc:
        raise TrainingSetupError(f"train.nproc is {nproc} but only {torch.cuda.device_count()} CUDA devices exist")
    job_dir = ctx.work_dir / "launch"
    shutil.rmtree(job_dir, ignore_errors=True)
    job_dir.mkdir(parents=True)
    (job_dir / JOB_FILE).write_text(job.to_json())
    (job_dir / PATHS_FILE).write_text(json.dumps({"out_dir": str(ctx.out_dir), "work_dir": str(ctx.work_dir)}))
    command = torchrun_command(job_dir, nproc)
    ctx.log(f"train: launching {nproc} processes: {' '.join(command)}")
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
        env=_worker_env(job),
        cwd=PROJECT_ROOT,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(PROGRESS_PREFIX):
                fraction, _, message = line[len(PROGRESS_PREFIX) :].partition(" ")
                ctx.progress(float(fraction), message)
            elif line:
                ctx.log(line)
        status = proc.wait()
    finally:
        stop_process_group(proc)
    if status != 0:
        raise _failure(job_dir, status)
    return json.loads((job_dir / RESULT_FILE).read_text())
