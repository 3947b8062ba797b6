"""The ``sweep`` flow: trials of a search space as Prefect tasks, scored on one fixed eval set, test read once.

Each trial is the ordinary pipeline's stages (``tasks.stages.run_stage``) on the base config with the trial's
parameters, recorded in lineage as a run of its own (``<sweep id>-t<NNN>``): stages that trials share have the
same fingerprint and are built once, by whichever trial gets there first (the others wait on its build lock
and reuse it). Training runs in a child process per trial while the task holds a slot of a global concurrency
limit (``gpu`` on CUDA, ``cpu-train`` otherwise). A failing trial is retried alone by Prefect (training resumes
from its checkpoints); a trial that still fails is recorded failed and asked again by the next run of the sweep.
Only the winner by the validation objective is evaluated on test, once (``test_reads`` in lineage).
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.runtime import task_run as task_runtime

from flows.pipeline import CPU_TRAIN_LIMIT, ensure_limit, retry_unless_unrecoverable, training_slot, uses_gpu
from storage.artifacts import ArtifactStore, Manifest
from storage.leaderboard import best, leaderboard_rows
from storage.lineage import LineageStore
from storage.stage_graph import DATA_STAGES, UPSTREAM
from tasks.config import PipelineConfig
from tasks.errors import UserError
from tasks.reporting.report import publish_run_report
from tasks.reporting.sweep_report import publish_sweep_report, ui_markdown
from tasks.run_recorder import error_text
from tasks.stages import run_stage, stage_key
from tasks.sweep import evalset
from tasks.sweep.spec import SweepSpec, apply_params, load_spec, resolve_spec, sweep_id
from tasks.sweep.study import objective_from_val_loss, open_study, plan, suggest
from tasks.sweep.trainer import train_in_child

SPEC_OBJECTIVE_KEYS = {"val_bpb": "bits_per_byte", "val_loss": "loss"}
_LINEAGE = threading.RLock()  # trials run in threads of this process: one lineage writer at a time
POLL_S = 0.5


def _tokens_per_byte(tokenize: Manifest) -> float | None:
    val = tokenize.counts.get("splits", {}).get("val", {})
    return val["tokens"] / val["bytes"] if val.get("bytes") else None


def _curve(telemetry: list[dict], tokenize: Manifest, objective: str) -> list[dict]:
    """The trial's periodic validation losses, and the same in objective units (one point per step)."""
    by_step = {row["step"]: row["val_loss"] for row in telemetry if row.get("val_loss") is not None}
    tpb = _tokens_per_byte(tokenize)
    return [
        {"step": s, "val_loss": v, "value": objective_from_val_loss(v, tpb, objective)}
        for s, v in sorted(by_step.items())
    ]


def _work_telemetry(store: ArtifactStore, fp: str) -> list[dict]:
    path = store.work_dir("train", fp) / "telemetry.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _record_stage(lineage: LineageStore, run_id: str, name: str, started: datetime, **kwargs: Any) -> None:
    with _LINEAGE:
        lineage.record_stage(run_id, name, kwargs.pop("status"), started, **kwargs)


def _stage(name: str, cfg: PipelineConfig, manifests: dict[str, Manifest], run_id: str, lineage: LineageStore, log):
    """One stage through ``run_stage``, recorded in the trial's lineage run (failures too)."""
    started = datetime.now(UTC)
    inputs = {u: manifests[u] for u in UPSTREAM[name]}
    try:
        manifest, reused = run_stage(name, cfg, inputs, run_id=run_id, log=log)
    except Exception as err:
        error = error_text(err)
        fp = stage_key(name, cfg, inputs).fingerprint
        _record_stage(lineage, run_id, name, started, status="failed", error=error, fingerprint=fp)
        raise
    _record_stage(lineage, run_id, name, started, status="cached" if reused else "completed", manifest=manifest)
    return manifest


@task(
    retries=1,
    retry_delay_seconds=1,
    retry_condition_fn=retry_unless_unrecoverable,
    cache_policy=NO_CACHE,
    task_run_name="trial-{number}",
)
def trial_task(sweep: dict[str, Any], number: int, params: dict[str, Any], replay: bool = False) -> dict[str, Any]:
    """One trial: data stages, training (child process, concurrency slot, pruning), score on the fixed eval set."""
    logger = get_run_logger()
    spec = SweepSpec.model_validate(sweep["spec"])
    cfg = apply_params(PipelineConfig.model_validate(sweep["base"]), params)
    store, lineage = ArtifactStore(cfg.root), LineageStore(sweep["lineage"])
    run_id = f"{sweep['sweep_id']}-t{number:03d}"
    started = time.perf_counter()
    with _LINEAGE:
        lineage.start_run(run_id, f"{spec.name}/trial-{number}", cfg.model_dump(), cfg.seed, sweep["flow_run_id"])
    try:
        manifests: dict[str, Manifest] = {}
        with _LINEAGE:  # run_stage reads lineage (tombstones) too; data stages are shared and mostly cached
            for name in DATA_STAGES:
                manifests[name] = _stage(name, cfg, manifests, run_id, lineage, logger.info)
        tokenize = manifests["tokenize"]
        pruning = None
        if spec.pruning is not None and not replay:
            pruning = {
                "spec": spec.model_dump(mode="json"),
                "journal": sweep["journal"],
                "study": sweep["sweep_id"],
                "trial": number,
                "tokens_per_byte": _tokens_per_byte(tokenize),
            }
        train_started = datetime.now(UTC)
        train_fp = stage_key("train", cfg, {"tokenize": tokenize}).fingerprint
        try:
            with training_slot(cfg, spec.concurrency):
                train_started = datetime.now(UTC)  # the stage's time counts from holding a slot
                trained = train_in_child(cfg, tokenize, run_id, pruning)
        except Exception as err:
            error = error_text(err)
            _record_stage(lineage, run_id, "train", train_started, status="failed", error=error, fingerprint=train_fp)
            raise
        result: dict[str, Any] = {
            "trial": number,
            "run_id": run_id,
            "params": params,
            "attempts": task_runtime.run_count,
            "eval_docs": sweep["eval_set"]["counts"]["docs"],
        }
        if trained["manifest"] is None:
            _record_stage(lineage, run_id, "train", train_started, status="pruned", fingerprint=train_fp)
            with _LINEAGE:
                lineage.finish_run(run_id, "pruned")
            curve = _curve(_work_telemetry(store, train_fp), tokenize, spec.objective)
            fingerprints = {name: m.fingerprint for name, m in manifests.items()} | {"train": train_fp}
            logger.info(f"trial {number}: pruned at step {trained['stopped_at_step']}")
            return result | {
                "status": "pruned",
                "pruned": True,
                "stopped_at_step": trained["stopped_at_step"],
                "curve": curve,
                "fingerprints": fingerprints,
                "elapsed_s": time.perf_counter() - started,
            }
        train = Manifest.model_validate_json(trained["manifest"])
        status = "cached" if trained["reused"] else "completed"
        _record_stage(lineage, run_id, "train", train_started, status=status, manifest=train)
        eval_set = Manifest.model_validate(sweep["eval_set"])
        score, _ = evalset.score_trial(store, train, manifests["tokenizer"], tokenize, eval_set, log=logger.info)
        with _LINEAGE:
            lineage.finish_run(run_id, "completed")
        fingerprints = {name: m.fingerprint for name, m in (manifests | {"train": train}).items()}
        return result | {
            "status": "completed",
            "pruned": False,
            "objective": score.counts[SPEC_OBJECTIVE_KEYS[spec.objective]],
            "val_loss": score.counts["loss"],
            "val_bpb": score.counts["bits_per_byte"],
            "eval_bytes": score.counts["bytes"],
            "eval_docs_in_train": score.counts["docs_in_train"],
            "curve": _curve(train.counts.get("telemetry") or [], tokenize, spec.objective),
            "fingerprints": fingerprints | {"score": score.fingerprint},
            "elapsed_s": time.perf_counter() - started,
        }
    except Exception as err:
        with _LINEAGE:
            lineage.finish_run(run_id, "failed", f"{type(err).__name__}: {err}")
        raise


def _warn_if_slots_are_narrower(cfg: PipelineConfig, spec: SweepSpec) -> None:
    """Trials train only as wide as the ``cpu-train`` limit, which an earlier run or an operator may have set."""
    if uses_gpu("train", cfg):
        return
    width = ensure_limit(CPU_TRAIN_LIMIT, spec.concurrency)
    if width < spec.concurrency:
        get_run_logger().warning(
            f"concurrency limit {CPU_TRAIN_LIMIT!r} is {width} wide: trials train {width} at a time, not "
            f"{spec.concurrency}; widen it in the UI (Concurrency) or with "
            f"`prefect gcl update {CPU_TRAIN_LIMIT} --limit {spec.concurrency}`"
        )


def _failed_row(number: int, params: dict, future: PrefectFuture, sweep: dict) -> dict[str, Any]:
    state = future.state
    try:
        state.result()
        error = f"trial ended in state {state.name}"
    except Exception as err:  # noqa: BLE001 - whatever the trial raised is its recorded error
        error = error_text(err)
    return {
        "trial": number,
        "run_id": f"{sweep['sweep_id']}-t{number:03d}",
        "params": params,
        "status": "failed",
        "pruned": False,
        "error": error,
        "attempts": _run_count(future),
    }


def _run_count(future: PrefectFuture) -> int | None:
    """How often Prefect ran a trial task (1 + its retries)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_task_run(future.task_run_id).run_count


def _run_trials(sweep: dict, spec: SweepSpec, study, lineage: LineageStore) -> None:
    """Replay finished trials (cached), then ask the study for the rest, keeping ``concurrency`` in flight."""
    import optuna
    from optuna.trial import TrialState

    logger = get_run_logger()
    finished, to_ask = plan(study, spec)
    attempts = {t["trial"]: t["attempts"] for t in lineage.trials(sweep["sweep_id"])}
    pending: list[tuple[Any, dict, PrefectFuture, bool]] = []
    for t in (t for t in finished if t.state == TrialState.COMPLETE):  # pruned trials keep their recorded row
        pending.append((t.number, t.params, trial_task.submit(sweep, t.number, t.params, replay=True), True))
    asked = 0
    while pending or asked < to_ask:
        while asked < to_ask and sum(1 for p in pending if not p[3]) < spec.concurrency:
            trial = study.ask()
            try:
                params = suggest(trial, spec)
                apply_params(PipelineConfig.model_validate(sweep["base"]), params)
            except UserError as err:  # a sampled combination the config rejects (e.g. heads not dividing width)
                study.tell(trial, state=TrialState.FAIL)
                with _LINEAGE:
                    lineage.record_trial(
                        sweep["sweep_id"],
                        {
                            "trial": trial.number,
                            "params": trial.params,
                            "status": "failed",
                            "error": str(err),
                            "attempts": 0,
                        },
                    )
                asked += 1
                continue
            pending.append((trial.number, params, trial_task.submit(sweep, trial.number, params), False))
            asked += 1
        done = [p for p in pending if p[2].state.is_final()]
        if not done:
            time.sleep(POLL_S)
            continue
        for entry in done:
            pending.remove(entry)
            number, params, future, replay = entry
            row = future.result() if future.state.is_completed() else _failed_row(number, params, future, sweep)
            if replay:  # a replay reads its stages from cache; the attempts that built them stay recorded
                row["attempts"] = attempts.get(number) or row.get("attempts")
            else:
                if row["status"] == "completed":
                    study.tell(number, row["objective"])
                elif row["status"] == "pruned":
                    study.tell(number, state=optuna.trial.TrialState.PRUNED)
                else:
                    study.tell(number, state=optuna.trial.TrialState.FAIL)
            with _LINEAGE:
                lineage.record_trial(sweep["sweep_id"], row)
            logger.info(f"trial {number} {row['status']}: {row.get('objective')} {params}")


def _base_data(base: PipelineConfig, run_id: str, lineage: LineageStore, flow_run_id: str | None):
    """The base config's data stages (recorded as a run): where the fixed evaluation documents come from."""
    lineage.start_run(run_id, f"{base.name}/base", base.model_dump(), base.seed, flow_run_id)
    manifests: dict[str, Manifest] = {}
    for name in DATA_STAGES:
        manifests[name] = _stage(name, base, manifests, run_id, lineage, get_run_logger().info)
    lineage.finish_run(run_id, "completed")
    return manifests


def _test_winner(
    sweep: dict, spec: SweepSpec, winner: dict, base_data: dict[str, Manifest], lineage: LineageStore, override: bool
) -> dict[str, Any]:
    """Evaluate the winner on test, once; a recorded read of this winner is returned instead of read again."""
    prior = lineage.test_reads(sweep["sweep_id"], spec.name)
    for read in prior:
        if read["sweep_id"] == sweep["sweep_id"] and read["trial"] == winner["trial"]:
            return read | {"reused": True}
    if prior and not override:
        first = prior[0]
        raise UserError(
            f"sweep {spec.name!r} already read its test split (trial {first['trial']} of {first['sweep_id']} at "
            f"{first['read_at']}): a second look makes test a tuning set; pass --allow-second-test to read it anyway"
        )
    cfg = apply_params(PipelineConfig.model_validate(sweep["base"]), winner["params"])
    store = ArtifactStore(cfg.root)
    run_id = winner["run_id"]
    manifests = {}
    for a in lineage.run_artifacts(run_id):
        manifests[a["stage"]] = store.load(a["stage"], a["fingerprint"])
    test_set, _ = evalset.build_eval_set(store, base_data["dedup"], base_data["tokenize"], "test", spec.eval_max_docs)
    score, _ = evalset.score_trial(store, manifests["train"], manifests["tokenizer"], manifests["tokenize"], test_set)
    for name in ("evaluate", "export"):
        manifests[name] = _stage(name, cfg, manifests, run_id, lineage, get_run_logger().info)
    read = {
        "sweep_id": sweep["sweep_id"],
        "sweep_name": spec.name,
        "trial": winner["trial"],
        "run_id": run_id,
        "train_fingerprint": manifests["train"].fingerprint,
        "test_set": test_set.fingerprint,
        "evaluate_fingerprint": manifests["evaluate"].fingerprint,
        "test_loss": score.counts["loss"],
        "test_bpb": score.counts["bits_per_byte"],
        "override": bool(prior),
    }
    lineage.record_test_read(read)
    _, report = publish_run_report(store, lineage, run_id, f"{spec.name}/trial-{winner['trial']}", manifests)
    own_split = manifests["evaluate"].counts.get("test", {})
    return read | {"reused": False, "own_split": own_split, "run_report": str(report["html"])}


def _flow_run_name() -> str:
    params = flow_run.get_parameters()
    name = Path(params.get("spec_path") or "sweep").stem
    return f"{name}-sweep-{datetime.now(UTC):%Y%m%d-%H%M%S}"


def resolve(
    spec_path: str | None,
    space: dict[str, Any] | None,
    base: str | None,
    trials: int | None,
    objective: str | None,
    sampler: str | None,
) -> tuple[SweepSpec, PipelineConfig]:
    """The spec from a YAML file, an inline space, or both (fields given here win)."""
    overrides = {"space": space, "base": base, "trials": trials, "objective": objective, "sampler": sampler}
    if spec_path:
        return load_spec(spec_path, **overrides)
    if not space or not base:
        raise UserError("sweep: give spec_path, or an inline space together with base (a pipeline config path)")
    return resolve_spec({k: v for k, v in overrides.items() if v is not None}, Path.cwd(), "inline sweep")


@flow(name="sweep", flow_run_name=_flow_run_name, persist_result=True, log_prints=True)
def sweep(
    spec_path: str | None = None,
    space: dict[str, list[Any]] | None = None,
    base: str | None = None,
    trials: int | None = None,
    objective: Literal["val_bpb", "val_loss"] | None = None,
    sampler: Literal["grid", "random", "tpe"] | None = None,
    test: bool = True,
    allow_second_test: bool = False,
) -> dict[str, Any]:
    """Tune on the fixed validation set, pick the best trial, evaluate it on test once."""
    spec, base_cfg = resolve(spec_path, space, base, trials, objective, sampler)
    sid = sweep_id(spec, base_cfg)
    store = ArtifactStore(base_cfg.root)
    lineage = LineageStore(store.lineage_path)
    if test and not allow_second_test:
        other = [r for r in lineage.test_reads(None, spec.name) if r["sweep_id"] != sid]
        if other:
            raise UserError(
                f"sweep {spec.name!r} already read its test split in {other[0]['sweep_id']}: tuning again and "
                "reading test again turns test into a validation set; pass --allow-second-test or test=false"
            )
    flow_run_id = str(flow_run.get_id()) if flow_run.get_id() else None
    base_data = _base_data(base_cfg, f"{sid}-base", lineage, flow_run_id)
    eval_set, _ = evalset.build_eval_set(store, base_data["dedup"], base_data["tokenize"], "val", spec.eval_max_docs)
    journal = store.root / "sweeps" / sid / "study.journal"
    info = {
        "sweep_id": sid,
        "spec": spec.model_dump(mode="json"),
        "base": base_cfg.model_dump(mode="json"),
        "lineage": str(store.lineage_path),
        "journal": str(journal),
        "flow_run_id": flow_run_id,
        "eval_set": eval_set.model_dump(mode="json"),
    }
    lineage.start_sweep(
        {
            "sweep_id": sid,
            "name": spec.name,
            "spec": json.dumps(info["spec"]),
            "base_config": json.dumps(info["base"]),
            "objective": spec.objective,
            "sampler": spec.sampler,
            "trials_planned": spec.n_trials,
            "eval_set": eval_set.fingerprint,
            "flow_run_id": flow_run_id,
        }
    )
    _warn_if_slots_are_narrower(base_cfg, spec)
    try:
        _run_trials(info, spec, open_study(spec, journal, sid), lineage)
        winner = best(lineage.trials(sid))
        if winner is None:
            raise RuntimeError(f"sweep {sid}: no trial completed; see `tokenmill lineage sweep {sid}`")
        lineage.finish_sweep(sid, "testing" if test else "completed", winner["trial"])
        result = _test_winner(info, spec, winner, base_data, lineage, allow_second_test) if test else None
    except Exception as err:
        lineage.finish_sweep(sid, "failed", None, f"{type(err).__name__}: {err}")
        raise
    lineage.finish_sweep(sid, "completed", winner["trial"])
    trials_now = lineage.trials(sid)
    rows = leaderboard_rows(trials_now, spec.objective)
    paths = publish_sweep_report(store, sid, spec, trials_now, result)
    markdown = ui_markdown(sid, spec, trials_now, result, paths["html"])
    create_markdown_artifact(key="sweep-report", markdown=markdown, description=str(paths["html"]))
    create_table_artifact(key="sweep-leaderboard", table=rows, description=f"sweep {sid}")
    return {
        "sweep_id": sid,
        "root": store.location,
        "winner": {k: winner[k] for k in ("trial", "run_id", "params", "objective")},
        "leaderboard": rows,
        "test": result,
        "report": str(paths["html"]),
    }
