"""The sweep's Optuna study: samplers, the successive-halving pruner, and a file journal shared by processes.

The study lives in ``<root>/sweeps/<sweep id>/study.journal`` (Optuna's ``JournalFileBackend``), so a rerun of
the sweep continues it: finished trials (complete or pruned) are kept, failed ones are asked again with the
same parameters, and only the missing number of new trials is sampled. Trials train in child processes
(``train_trial``); they report their periodic validation numbers to the same journal, where the pruner
compares them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from tasks.sweep.spec import Pruning, Range, SweepSpec, params_key

optuna.logging.set_verbosity(optuna.logging.WARNING)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _pruner(pruning: Pruning | None) -> optuna.pruners.BasePruner:
    if pruning is None:
        return optuna.pruners.NopPruner()
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=pruning.min_steps, reduction_factor=pruning.reduction_factor, min_early_stopping_rate=0
    )


def _sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    if spec.sampler == "tpe":  # constant_liar: trials in flight count as bad, so concurrent asks spread out
        return optuna.samplers.TPESampler(seed=spec.seed, constant_liar=True)
    return optuna.samplers.RandomSampler(seed=spec.seed)  # grid points are enqueued, so this samples random only


def _storage(path: Path) -> JournalStorage:
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def open_study(spec: SweepSpec, journal: Path, name: str) -> optuna.Study:
    return optuna.create_study(
        study_name=name,
        storage=_storage(journal),
        sampler=_sampler(spec),
        pruner=_pruner(spec.pruning),
        direction="minimize",
        load_if_exists=True,
    )


def suggest(trial: optuna.Trial, spec: SweepSpec) -> dict[str, Any]:
    """The trial's value for every path of the space (fixed values of enqueued trials come back as given)."""
    params = {}
    for path, values in spec.space.items():
        if isinstance(values, Range):
            suggest_range = trial.suggest_int if values.integer else trial.suggest_float
            params[path] = suggest_range(path, values.low, values.high, log=values.log)
        else:
            params[path] = trial.suggest_categorical(path, values)
    return params


def plan(study: optuna.Study, spec: SweepSpec) -> tuple[list[FrozenTrial], int]:
    """Finished trials to replay (from cache), and how many trials to ask for now.

    Stale running trials (a killed sweep) are marked failed; the parameters of failed trials (and, for a grid,
    every combination not yet finished) are enqueued so they run again, with the same fingerprints.
    """
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.state == TrialState.RUNNING:
            study.tell(t.number, state=TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in FINISHED]
    done = {params_key(t.params) for t in finished}
    queued = {params_key(t.params) for t in trials if t.state == TrialState.WAITING}
    retry = [t.params for t in trials if t.state == TrialState.FAIL]
    wanted = spec.grid()[: spec.n_trials] if spec.sampler == "grid" else retry
    for params in wanted:
        if params_key(params) not in done | queued:
            study.enqueue_trial(params)
            queued.add(params_key(params))
    return finished, max(spec.n_trials - len(finished), 0)


def objective_from_val_loss(val_loss: float, tokens_per_byte: float | None, objective: str) -> float:
    """A periodic validation loss (nats per token of the trial's own val split) in the objective's units."""
    if objective == "val_bpb" and tokens_per_byte:
        return val_loss / math.log(2) * tokens_per_byte
    return val_loss


def pruning_callback(
    journal: Path, name: str, trial_number: int, spec: SweepSpec, tokens_per_byte: float | None
) -> tuple[Callable[[int, float], bool], list[int]]:
    """A ``should_stop(step, val_loss)`` that reports to the study and asks its pruner; the steps it was asked at."""
    study = optuna.load_study(study_name=name, storage=_storage(journal), pruner=_pruner(spec.pruning))
    trial_id = next(t._trial_id for t in study.get_trials(deepcopy=False) if t.number == trial_number)
    trial = optuna.trial.Trial(study, trial_id)
    asked: list[int] = []

    def should_stop(step: int, val_loss: float) -> bool:
        asked.append(step)
        trial.report(objective_from_val_loss(val_loss, tokens_per_byte, spec.objective), step)
        return trial.should_prune()

    return should_stop, asked
