"""Run a training job on several processes under ``torchrun``, from inside the (Prefect-free) train stage.

``torchrun --standalone`` starts ``nproc`` copies of ``tasks.training.worker`` in its own process group and
session; their output is streamed to ``ctx.log`` and their progress lines to ``ctx.progress``. If anything
goes wrong on this side (an exception, Ctrl-C, a cancelled task) the whole group is terminated, then killed.
A failed run raises with the failing rank's error, keeping whether a retry (= resume) can help.

Several machines (``train.nnodes > 1``): the node that runs the train stage leads. It writes the job folder on
the shared data root, including ``rendezvous.json``, and runs its share under ``torchrun --nnodes … --rdzv_*``;
every other node runs ``python -m tasks.training.launch join <job folder> --node-rank K``, which waits for that
folder and starts the same torchrun with its own node rank. Ranks read and write only the shared job folder (rank 0, on
whichever node, writes the model into the leader's artifact folder and ``result.json``), so the leader alone
publishes the artifact once every node's torchrun agent has passed its exit barrier.

Note: torchrun's rendezvous store listens on all interfaces; on shared hosts run it in a private network
namespace (the tests use ``unshare -n``) or with ``torch.multiprocessing.spawn`` and a file:// rendezvous.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from storage.artifacts import StageContext
from tasks.config import TrainConfig
from tasks.training.job import TrainingSetupError, TrainJob, UnrecoverableTrainingError
from tasks.training.worker import JOB_FILE, PATHS_FILE, PROGRESS_PREFIX, RESULT_FILE

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class DistributedTrainingError(RuntimeError):
    """A rank of a torchrun job failed with an error a resume may fix."""


RENDEZVOUS_FILE = "rendezvous.json"


@dataclass(frozen=True)
class Rendezvous:
    """Where the nodes of a multi-node job meet: the same on every node (``torchrun --rdzv_*``)."""

    nnodes: int
    nproc_per_node: int
    endpoint: str
    id: str
    backend: str = "c10d"

    @classmethod
    def of(cls, cfg: TrainConfig, default_id: str) -> Rendezvous | None:
        """The rendezvous ``cfg`` asks for, or None for one machine (``--standalone``)."""
        if cfg.nnodes == 1:
            return None
        assert cfg.rdzv_endpoint, "TrainConfig validation requires rdzv_endpoint when nnodes > 1"
        return cls(cfg.nnodes, cfg.nproc, cfg.rdzv_endpoint, cfg.rdzv_id or default_id, cfg.rdzv_backend)


def torchrun_command(job_dir: Path, nproc: int, rendezvous: Rendezvous | None = None, node_rank: int = 0) -> list[str]:
    """``torchrun --standalone`` on one machine; with ``rendezvous``, this node's share of a multi-node job."""
    if rendezvous is None:
        placement = ["--standalone", f"--nproc_per_node={nproc}"]
    else:
        if not 0 <= node_rank < rendezvous.nnodes:
            raise ValueError(f"node rank {node_rank} is outside 0..{rendezvous.nnodes - 1}")
        placement = [
            f"--nnodes={rendezvous.nnodes}",
            f"--nproc_per_node={rendezvous.nproc_per_node}",
            f"--rdzv_backend={rendezvous.backend}",
            f"--rdzv_endpoint={rendezvous.endpoint}",
            f"--rdzv_id={rendezvous.id}",
        ]
        if rendezvous.backend == "static":  # c10d assigns node ranks itself (torchrun ignores --node_rank)
            placement.append(f"--node_rank={node_rank}")
    return [sys.executable, "-m", "torch.distributed.run", *placement, "-m", "tasks.training.worker", str(job_dir)]


def stage_fingerprint_of(work_dir: Path) -> str:
    """The train stage's fingerprint, from its work folder (``ArtifactStore.work_dir``: ``.<fingerprint>.work``)."""
    return work_dir.name.removeprefix(".").removesuffix(".work")


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


def _check_devices(cfg: TrainConfig) -> None:
    if cfg.device == "cuda" and torch.cuda.device_count() < cfg.nproc:
        raise TrainingSetupError(f"train.nproc is {cfg.nproc} but only {torch.cuda.device_count()} CUDA devices exist")


def launch_distributed(job: TrainJob, ctx: StageContext) -> dict:
    """Train ``job`` on ``nproc`` processes (times ``nnodes`` machines); returns rank 0's counts."""
    _check_devices(job.cfg)
    job_dir = ctx.work_dir / "launch"
    shutil.rmtree(job_dir, ignore_errors=True)
    job_dir.mkdir(parents=True)
    (job_dir / JOB_FILE).write_text(job.to_json())
    (job_dir / PATHS_FILE).write_text(json.dumps({"out_dir": str(ctx.out_dir), "work_dir": str(ctx.work_dir)}))
    rendezvous = Rendezvous.of(job.cfg, default_id=stage_fingerprint_of(ctx.work_dir))
    if rendezvous is not None:  # written last: followers start once they see it
        (job_dir / RENDEZVOUS_FILE).write_text(json.dumps(asdict(rendezvous)))
        ctx.log(
            f"train: leading {rendezvous.nnodes} nodes; on each other node K run: "
            f"python -m tasks.training.launch join {job_dir} --node-rank K"
        )
    command = torchrun_command(job_dir, job.cfg.nproc, rendezvous)
    ctx.log(f"train: launching {job.cfg.nproc} processes: {' '.join(command)}")
    status = _run_torchrun(command, _worker_env(job), ctx)
    if status != 0:
        raise _failure(job_dir, status)
    return json.loads((job_dir / RESULT_FILE).read_text())


def _run_torchrun(command: list[str], env: dict[str, str], ctx: StageContext) -> int:
    """Run torchrun in its own process group, streaming its output to ``ctx``; returns its exit status."""
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
        env=env,
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
        return proc.wait()
    finally:
        stop_process_group(proc)


def join_command(job_dir: Path, node_rank: int, timeout_s: float = 3600.0, poll_s: float = 2.0) -> list[str]:
    """The torchrun command for node ``node_rank`` of the job the leader described in ``job_dir``.

    Waits up to ``timeout_s`` for the leader to write the job folder (nodes may start in any order).
    """
    deadline = time.monotonic() + timeout_s
    while not (job_dir / RENDEZVOUS_FILE).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {RENDEZVOUS_FILE} in {job_dir} after {timeout_s:.0f} s: is the train stage up?")
        time.sleep(poll_s)
    rendezvous = Rendezvous(**json.loads((job_dir / RENDEZVOUS_FILE).read_text()))
    if not 1 <= node_rank < rendezvous.nnodes:
        raise ValueError(
            f"node rank {node_rank}: followers are nodes 1..{rendezvous.nnodes - 1} (node 0 runs the train stage)"
        )
    return torchrun_command(job_dir, rendezvous.nproc_per_node, rendezvous, node_rank)


def join(job_dir: Path, node_rank: int, timeout_s: float = 3600.0) -> int:
    """Run this node's share of a multi-node job led by a train stage elsewhere; returns torchrun's exit status."""
    command = join_command(job_dir, node_rank, timeout_s)
    job = TrainJob.from_json((job_dir / JOB_FILE).read_text())
    _check_devices(job.cfg)
    ctx = StageContext(out_dir=job_dir, work_dir=job_dir, log=print)
    print(f"train: joining as node {node_rank}: {' '.join(command)}", flush=True)
    return _run_torchrun(command, _worker_env(job), ctx)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.training.launch", description=join.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    joining = sub.add_parser("join", help="join a multi-node training job as one of its nodes")
    joining.add_argument("job_dir", type=Path, help="the job folder the train stage logged (on the shared root)")
    joining.add_argument("--node-rank", type=int, required=True, help="this node's rank, 1..nnodes-1")
    joining.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the job folder")
    args = parser.parse_args(argv)
    return join(args.job_dir, args.node_rank, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
