"""Pruning: the training loop asks ``should_stop`` after each periodic validation; a pruned run publishes nothing."""

from __future__ import annotations

from pathlib import Path

import optuna

from storage.artifacts import ArtifactStore
from storage.stage_graph import DATA_STAGES, UPSTREAM
from tasks.stages import run_stage, stage_key
from tasks.sweep.spec import SweepSpec
from tasks.sweep.study import open_study, plan, suggest
from tasks.sweep.trainer import train_trial
from tests.support.corpus import tiny_config


def test_a_trial_worse_than_its_rung_is_pruned_and_leaves_no_artifact(corpus: Path, tmp_path: Path):
    cfg = tiny_config(corpus, tmp_path / "root")
    manifests = {}
    for name in DATA_STAGES:
        manifests[name], _ = run_stage(name, cfg, {u: manifests[u] for u in UPSTREAM[name]})
    spec = SweepSpec(
        base="base.yaml", space={"train.learning_rate": [3e-3]}, pruning={"min_steps": 3, "reduction_factor": 2}
    )
    journal = tmp_path / "study.journal"
    study = open_study(spec, journal, "s")
    distribution = optuna.distributions.CategoricalDistribution([3e-3])
    for value in (0.1, 0.2):  # two earlier trials that reached the first rung (step 3) far better
        study.add_trial(
            optuna.trial.create_trial(
                params={"train.learning_rate": 3e-3},
                distributions={"train.learning_rate": distribution},
                value=value,
                intermediate_values={3: value},
                system_attrs={"completed_rung_0": value},
            )
        )
    trial = study.ask()
    pruning = {"spec": spec.model_dump(mode="json"), "journal": str(journal), "study": "s", "trial": trial.number}
    result = train_trial(
        cfg.model_dump_json(), manifests["tokenize"].model_dump_json(), "r", pruning | {"tokens_per_byte": 0.5}
    )
    assert result == {"manifest": None, "reused": False, "stopped_at_step": 3}
    store = ArtifactStore(cfg.root)
    assert store.published("train") == []  # a half-trained model never takes the full run's fingerprint
    fp = stage_key("train", cfg, {"tokenize": manifests["tokenize"]}).fingerprint
    assert (store.work_dir("train", fp) / "telemetry.jsonl").exists()  # its curve stays readable
    assert list(study.trials[-1].intermediate_values) == [3]


def test_a_rerun_keeps_finished_trials_and_asks_failed_ones_again(tmp_path: Path):
    spec = SweepSpec(base="b.yaml", space={"train.learning_rate": [1e-3, 3e-3, 1e-2]})
    study = open_study(spec, tmp_path / "j", "s")
    finished, to_ask = plan(study, spec)
    assert (finished, to_ask) == ([], 3)
    first, second = study.ask(), study.ask()
    assert (
        suggest(first, spec) == {"train.learning_rate": 1e-3} and suggest(second, spec)["train.learning_rate"] == 3e-3
    )
    study.tell(first, 1.0)
    study.tell(second, state=optuna.trial.TrialState.FAIL)
    study = open_study(spec, tmp_path / "j", "s")  # the next run of the sweep
    finished, to_ask = plan(study, spec)
    assert [t.number for t in finished] == [first.number] and to_ask == 2
    assert {suggest(study.ask(), spec)["train.learning_rate"] for _ in range(2)} == {3e-3, 1e-2}
