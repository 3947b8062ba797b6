"""Ctrl-C and SIGTERM of ``tokenmill run`` during training: a quick exit, a cancelled run in lineage, a rerun
that resumes from the checkpoint, and no Prefect server left behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from storage.artifacts import ArtifactStore
from storage.lineage import LineageStore
from tests.support.corpus import tiny_config, write_corpus

REPO = Path(__file__).resolve().parents[2]
EXIT_WITHIN_S = 20  # "a few seconds", with room for a loaded 2-core machine


def _start(config: Path, mark: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENMILL_TEST_MARK": mark, "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("PREFECT_API_URL", None)  # the command starts its own temporary server
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )


def _checkpoint_steps(root: Path) -> list[int]:
    found = (re.search(r"(\d+)", p.stem) for p in root.glob("train/.*.work/checkpoints/*.pt"))
    return sorted(int(m.group(1)) for m in found if m)


def _wait_for_checkpoint_after(proc: subprocess.Popen, root: Path, step: int, log: Path, timeout_s: float = 400) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before training checkpointed:\n{log.read_text()[-3000:]}"
        steps = [s for s in _checkpoint_steps(root) if s > step]
        if steps:
            return steps[-1]
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint after step {step} within {timeout_s} s:\n{log.read_text()[-3000:]}")


def _interrupt(proc: subprocess.Popen, sig: signal.Signals, group: bool) -> tuple[int, float]:
    sent = time.monotonic()
    if group:
        os.killpg(proc.pid, sig)  # what Ctrl-C does: every process of the foreground group gets it
    else:
        proc.send_signal(sig)  # what `kill PID` or a process manager does
    try:
        rc = proc.wait(timeout=EXIT_WITHIN_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"still running {EXIT_WITHIN_S} s after {sig.name}") from None
    return rc, time.monotonic() - sent


def _processes_marked(mark: str) -> list[int]:
    """Live processes started by the command (they inherit its environment), e.g. its Prefect server."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"TOKENMILL_TEST_MARK={mark}".encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _latest_run(root: Path) -> dict:
    lineage = LineageStore(ArtifactStore(root).lineage_path, read_only=True)
    run = lineage.runs(limit=1)[0]
    return run | {"stages": {r["stage"]: r for r in lineage.stage_runs(run["run_id"])}}


def _assert_cancelled(root: Path, log: Path, sig: signal.Signals) -> None:
    run = _latest_run(root)
    assert run["status"] == "cancelled" and run["error"] == f"train: interrupted ({sig.name})", run
    assert run["stages"]["train"]["status"] == "cancelled"
    assert f"interrupted by {sig.name}: the run is recorded as cancelled" in log.read_text()


@pytest.mark.slow
def test_sigint_and_sigterm_during_training_exit_quickly_and_the_rerun_resumes(tmp_path: Path):
    write_corpus(tmp_path / "corpus")
    root = tmp_path / "root"
    cfg = tiny_config(
        tmp_path / "corpus", root, train={"max_steps": 1500, "checkpoint_interval": 5, "eval_interval": 500}
    )
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    mark = uuid.uuid4().hex

    # Ctrl-C: SIGINT to the whole process group
    log = tmp_path / "first.log"
    proc = _start(config, mark, log)
    first_step = _wait_for_checkpoint_after(proc, root, 0, log)
    rc, took = _interrupt(proc, signal.SIGINT, group=True)
    assert rc == 130, log.read_text()[-3000:]
    _assert_cancelled(root, log, signal.SIGINT)
    assert _checkpoint_steps(root), "no checkpoint left to resume from"
    assert _processes_marked(mark) == [], "a process of the interrupted command outlived it"

    # SIGTERM to the command alone, in the rerun, after it resumed and checkpointed further
    log = tmp_path / "second.log"
    proc = _start(config, mark, log)
    _wait_for_checkpoint_after(proc, root, max(_checkpoint_steps(root)), log)
    rc, took_term = _interrupt(proc, signal.SIGTERM, group=False)
    assert rc == 143, log.read_text()[-3000:]
    _assert_cancelled(root, log, signal.SIGTERM)
    assert "train: resumed from checkpoint at step" in log.read_text(), "the rerun did not resume"
    time.sleep(1)
    assert _processes_marked(mark) == []

    # the last rerun finishes from the newest checkpoint
    log = tmp_path / "third.log"
    proc = _start(config, mark, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    run = _latest_run(root)
    assert run["status"] == "completed"
    train = json.loads(run["stages"]["train"]["counts"])
    assert train["resumed_from_step"] >= first_step and train["steps"] == 1500
    print(f"exit after SIGINT {took:.1f} s, after SIGTERM {took_term:.1f} s")
