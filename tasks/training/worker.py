"""One training process of a data-parallel run: ``torchrun … -m tasks.training.worker <job-folder>``.

The job folder (written by ``tasks/training/launch.py``) holds ``job.json`` (the ``TrainJob``) and ``paths.json``
(artifact temp folder and work folder). Rank 0 prints log lines, and progress as ``PROGRESS_PREFIX`` lines
the launcher turns back into ``ctx.progress`` calls; it writes the counts to ``result.json``. A failing rank
writes ``error-rank<r>.json`` (type, message, whether a retry can help) before exiting non-zero.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from storage.artifacts import StageContext
from tasks.training import distributed
from tasks.training.distributed import DistEnv

PROGRESS_PREFIX = "@@tokenmill-progress "
RESULT_FILE = "result.json"
JOB_FILE = "job.json"
PATHS_FILE = "paths.json"


def _print(line: str) -> None:
    print(line, flush=True)


def run_worker(job_dir: Path, env: DistEnv, init_method: str = "env://") -> int:
    """Run one rank of the job in ``job_dir``; returns the process exit status."""
    from tasks.training.job import TrainJob, pick_device
    from tasks.training.loop import run_training

    job = TrainJob.from_json((job_dir / JOB_FILE).read_text())
    paths = json.loads((job_dir / PATHS_FILE).read_text())
    ctx = StageContext(
        out_dir=Path(paths["out_dir"]),
        work_dir=Path(paths["work_dir"]),
        log=_print if env.is_main else (lambda message: None),
        progress=lambda fraction, message: (
            _print(f"{PROGRESS_PREFIX}{fraction:.6f} {message}") if env.is_main else None
        ),
    )
    try:
        distributed.init_process_group(env, pick_device(job.cfg.device, env.local_rank).type, init_method)
        counts = run_training(job, ctx, env)
        if env.is_main:
            (job_dir / RESULT_FILE).write_text(json.dumps(counts, sort_keys=True))
        return 0
    except BaseException as err:
        error = {
            "type": type(err).__name__,
            "message": str(err),
            "retryable": getattr(err, "retryable", True),
            "traceback": traceback.format_exc(),
        }
        (job_dir / f"error-rank{env.rank}.json").write_text(json.dumps(error))
        traceback.print_exc()
        return 1
    finally:
        distributed.destroy_process_group()


def spawn_entry(rank: int, world_size: int, init_method: str, job_dir: str) -> None:
    """Entry point for ``torch.multiprocessing.spawn`` (tests): no torchrun, a file:// rendezvous."""
    status = run_worker(Path(job_dir), DistEnv(rank=rank, world_size=world_size, local_rank=rank), init_method)
    if status:
        raise SystemExit(status)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tasks.training.worker <job-folder>", file=sys.stderr)
        return 2
    return run_worker(Path(argv[0]), DistEnv.from_env())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
