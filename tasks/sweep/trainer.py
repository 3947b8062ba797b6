"""A trial's train stage in a child process of its own.

Trials train concurrently. In one process they would share torch's global random generator (model
initialisation would depend on which trial seeded it last) and the interpreter lock; a spawned process per
trial gives each the same weights it would get alone, and real parallelism. The child calls the ordinary
``run_stage("train", …)`` (same fingerprint, same artifact, same checkpoints and resume) and reports its periodic
validation numbers to the sweep's Optuna journal, whose pruner may stop it: nothing is then published.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from storage.artifacts import Manifest
from tasks.config import PipelineConfig
from tasks.training.job import TrainingStopped


def train_trial(cfg_json: str, tokenize_json: str, run_id: str, pruning: dict[str, Any] | None) -> dict[str, Any]:
    """Run (or reuse) the train stage; returns the manifest JSON, whether it was reused, and where it stopped."""
    from tasks.stages import run_stage
    from tasks.sweep.spec import SweepSpec
    from tasks.sweep.study import pruning_callback

    cfg = PipelineConfig.model_validate_json(cfg_json)
    inputs = {"tokenize": Manifest.model_validate_json(tokenize_json)}
    should_stop, asked = None, []
    if pruning is not None:
        spec = SweepSpec.model_validate(pruning["spec"])
        should_stop, asked = pruning_callback(
            Path(pruning["journal"]), pruning["study"], pruning["trial"], spec, pruning["tokens_per_byte"]
        )
    try:
        manifest, reused = run_stage("train", cfg, inputs, run_id=run_id, should_stop=should_stop)
    except TrainingStopped:
        return {"manifest": None, "reused": False, "stopped_at_step": asked[-1]}
    return {"manifest": manifest.model_dump_json(), "reused": reused, "stopped_at_step": None}


def train_in_child(cfg: PipelineConfig, tokenize: Manifest, run_id: str, pruning: dict | None) -> dict[str, Any]:
    """``train_trial`` in a fresh spawned process; its exception (if any) is raised here."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(train_trial, cfg.model_dump_json(), tokenize.model_dump_json(), run_id, pruning).result()
