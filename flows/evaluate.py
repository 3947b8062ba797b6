"""The ``evaluate`` flow: evaluate (and optionally export) an existing checkpoint on existing token shards.

No retraining: the train, tokenize and tokenizer artifacts are found on disk (the tokenizer through the
manifests' inputs when not given), the evaluate stage runs through the same cached, content-addressed
``stage_task`` as in the pipeline, and the run gets its own report and lineage records. It is a flow of its
own so it can be scheduled or deployed like ``pipeline``; ``tokenmill evaluate`` runs it from the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from storage.artifacts import ArtifactStore, Manifest
from storage.lineage import LineageStore
from tasks.config import EvaluateConfig, PipelineConfig, TokenizerConfig
from tasks.errors import UserError
from tasks.run_recorder import RunRecorder


def resolve_inputs(model: str | Path, tokens: str | Path, tokenizer: str | Path | None) -> dict[str, Manifest]:
    """Manifests of the train, tokenize and tokenizer artifacts an evaluation reads; bad ones are ``UserError``."""
    _, train = _artifact(model, "--model")
    store, tokenize = _artifact(tokens, "--tokens")
    if train.stage != "train":
        raise UserError(f"--model {model} is a {train.stage!r} artifact; pass a train artifact folder")
    if tokenize.stage != "tokenize":
        raise UserError(f"--tokens {tokens} is a {tokenize.stage!r} artifact; pass a tokenize artifact folder")
    if tokenizer is not None:
        _, tok = _artifact(tokenizer, "--tokenizer")
    else:
        tok = store.ancestors(tokenize).get("tokenizer")
        if tok is None:
            raise UserError(f"cannot find the tokenizer {tokens} was made with; pass --tokenizer")
    if tok.stage != "tokenizer":
        raise UserError(f"--tokenizer {tokenizer} is a {tok.stage!r} artifact; pass a tokenizer artifact folder")
    return {"train": train, "tokenize": tokenize, "tokenizer": tok}


def _artifact(folder: str | Path, option: str) -> tuple[ArtifactStore, Manifest]:
    try:
        return ArtifactStore.of_artifact(folder)
    except FileNotFoundError as err:
        raise UserError(f"{option}: {err}") from None


def _flow_run_name() -> str:
    from datetime import UTC, datetime

    return f"{flow_run.get_parameters().get('name', 'evaluate')}-{datetime.now(UTC):%Y%m%d-%H%M%S}"


@flow(name="evaluate", flow_run_name=_flow_run_name, persist_result=True, log_prints=True)
def evaluate_flow(
    model: str,
    tokens: str,
    tokenizer: str | None = None,
    root: str | None = None,
    evaluate: EvaluateConfig = EvaluateConfig(),
    seed: int = 1337,
    name: str = "evaluate",
    export: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Evaluate the train artifact MODEL on the tokenize artifact TOKENS (val and test splits, probes, samples)."""
    from flows.pipeline import lineage_run_id, publish_report, run_stages

    inputs = resolve_inputs(model, tokens, tokenizer)
    store = ArtifactStore(root) if root else ArtifactStore.of_artifact(model)[0]
    special = inputs["tokenizer"].params.get("special_tokens") or TokenizerConfig().special_tokens
    cfg = PipelineConfig(
        name=name, root=store.location, seed=seed, evaluate=evaluate, tokenizer=TokenizerConfig(special_tokens=special)
    )
    lineage = LineageStore(store.lineage_path)
    run_id = lineage_run_id(lineage)
    record = RunRecorder(lineage, run_id)
    record.start(cfg, str(flow_run.get_id()))
    stages = ("evaluate", "export") if export else ("evaluate",)
    upstream = ArtifactStore.of_artifact(tokens)[0].ancestors(inputs["tokenize"])  # data summary of the report
    manifests = {k: m.model_dump() for k, m in (upstream | inputs).items()}
    manifests = run_stages(cfg, stages, run_id, ["evaluate"] if force else [], record, manifests)
    report = publish_report(store, lineage, run_id, name, manifests)
    record.finish()
    return {
        "run_id": run_id,
        "root": store.location,
        "artifacts": {k: manifests[k]["path"] for k in stages},
        "report": str(report["html"]),
    }
