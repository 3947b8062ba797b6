"""The stages bound to the artifact store: parameters, inputs and the function that produces each.

This is the one place that knows which configuration section and which upstream artifacts each stage
reads. It has no Prefect import: the CLI, the Prefect tasks and tests all call ``run_stage``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from storage.artifacts import ArtifactStore, Manifest, StageContext, StageKey
from storage.faults import maybe_fail
from storage.hashing import canonical_json, fingerprint
from storage.ledger import compact_ledger_folder
from storage.stage_graph import DOWNSTREAM, STAGES, UPSTREAM, StageName, downstream  # noqa: F401 (re-exported)
from tasks.config import PipelineConfig
from tasks.data import clean, decontaminate, dedup, ingest, tokenize, tokenizer
from tasks.errors import UserError
from tasks.evaluation import evaluate
from tasks.modeling import export
from tasks.parts import executor_for
from tasks.stage_contract import StageResult, StageRun
from tasks.training import train


@dataclass(frozen=True)
class StageSpec:
    """A stage bound to the configuration: its code version, its parameters and its producing function."""

    name: str
    version: str
    params: Callable[[PipelineConfig], dict[str, Any]]
    produce: Callable[[StageRun], StageResult]
    ledger_links: tuple[str, ...] = ()  # ledger columns indexed for reverse lookup (lineage takedown)
    # The inputs ``produce`` reads from local files (None: all). On a remote root only those are downloaded; the
    # others are read by object URI, by the parts and (footers, ledger columns) by this process.
    local_inputs: tuple[str, ...] | None = None


def _source_snapshot(cfg: PipelineConfig) -> dict[str, Any]:
    """What ingest reads, cheaply: every listed file's relative path, size and mtime. Changes rerun ingest."""
    snapshot = {}
    for source in cfg.sources:
        digest = hashlib.sha256()
        for f in ingest.list_files(source):
            digest.update(f"{f.rel}\x1f{f.size}\x1f{f.mtime}\x1f{f.error}\n".encode())
        snapshot[source.name] = digest.hexdigest()
    return snapshot


def _ingest_params(cfg: PipelineConfig) -> dict[str, Any]:
    # model_dump redacts credentials (SourceConfig's serializers): they never reach manifests or lineage
    return {"sources": [s.model_dump(exclude=set(s.MIXTURE)) for s in cfg.sources], "snapshot": _source_snapshot(cfg)}


def data_version(cfg: PipelineConfig) -> str:
    """A short hash of the sources' snapshot (paths, sizes, mtimes): changes whenever ingest would rerun."""
    return fingerprint("data", "1", _source_snapshot(cfg), [])[:8]


def _tombstones(cfg: PipelineConfig) -> list[str]:
    """Doc ids and content hashes taken down through lineage; the clean stage drops them (sorted, stable)."""
    from storage.lineage import LineageStore

    path = ArtifactStore(cfg.root).lineage_path
    if not path.exists():
        return []
    rows = LineageStore(path, read_only=True).tombstones()
    return sorted({r["doc_id"] for r in rows if r["doc_id"]} | {r["content_hash"] for r in rows if r["content_hash"]})


def _clean_params(cfg: PipelineConfig) -> dict[str, Any]:
    params = cfg.clean.model_dump(exclude=set(cfg.clean.REPORTING))
    blocked = _tombstones(cfg)
    if blocked:  # only present when there are takedowns, so fingerprints of ordinary runs stay unchanged
        params["tombstones"] = hashlib.sha256("\n".join(blocked).encode()).hexdigest()
    return params


def _tokenize_params(cfg: PipelineConfig) -> dict[str, Any]:
    params = cfg.tokenize.model_dump() | {"eot": cfg.tokenizer.special_tokens[0]}
    decon = cfg.decontaminate
    if decon.enabled:  # each named set by its content, so an edited benchmark file reruns tokenize
        sets = [s.model_dump() | {"content": decontaminate.set_fingerprint(s)} for s in decon.sets]
        params["decontaminate"] = decon.model_dump() | {"sets": sets}
    return params


def _splits(m: Manifest, split: str) -> list:
    return m.files_under(f"tokens/{split}-", ".arrow")


def _produce_ingest(run: StageRun) -> StageResult:
    cfg, store = run.cfg, ArtifactStore(run.cfg.root)
    return ingest.ingest(
        cfg.sources, run.ctx, store.cache_dir("ingest"), cfg.workers, fragments=store.shared_cache("ingest")
    )


def _produce_clean(run: StageRun) -> StageResult:
    ingested = run.inputs["ingest"]
    return clean.clean(
        ingested.files_under("docs/"),
        run.cfg.clean,
        run.ctx,
        workers=run.cfg.workers,
        blocked=set(_tombstones(run.cfg)),
        sources=ingested.sources_under("docs/"),
    )


def _produce_dedup(run: StageRun) -> StageResult:
    previous = dedup.resolve_previous(run.cfg.dedup.against, run.cfg.root)
    clean = run.inputs["clean"]
    return dedup.dedup(
        clean.files_under("docs/"), run.cfg.dedup, run.ctx, previous=previous, sources=clean.sources_under("docs/")
    )


def require_documents(name: str, inputs: dict[str, Manifest]) -> None:
    """A ``UserError`` when a document stage feeding ``name`` kept no document: every one was dropped upstream.

    Without it the next stages run on nothing (a tokenizer trained on no text) and training fails minutes later
    with an unrelated message."""
    for upstream, manifest in inputs.items():
        counts = manifest.counts
        if "docs_in" not in counts or counts.get("kept") != 0:
            continue
        dropped = ", ".join(f"{reason} {n}" for reason, n in (counts.get("dropped") or {}).items())
        raise UserError(
            f"{upstream} kept none of its {counts['docs_in']} documents ({dropped or 'no input'}), so {name} has "
            "nothing to work on; `tokenmill lineage source NAME` shows why per source — loosen the settings that "
            "drop them or add sources"
        )


def _produce_tokenizer(run: StageRun) -> StageResult:
    docs = run.inputs["dedup"].files_under("docs/")
    return StageResult(extra=tokenizer.train_tokenizer(docs, run.cfg.tokenizer, run.ctx))


def _produce_tokenize(run: StageRun) -> StageResult:
    """On a remote root the parts read the dedup shards and the tokenizer from the store (``sources_under``)."""
    docs, tok, cfg = run.inputs["dedup"].sources_under("docs/"), run.inputs["tokenizer"], run.cfg
    return tokenize.tokenize(
        docs,
        tok.file(""),
        cfg.tokenizer,
        cfg.tokenize,
        run.ctx,
        cfg.workers,
        tokenizer_uri=next(iter(tok.sources_under(tokenizer.TOKENIZER_FILE)), None),
        decontaminate=cfg.decontaminate,
        cache_dir=ArtifactStore(cfg.root).cache_dir("decontaminate"),
    )


def _produce_train(run: StageRun) -> StageResult:
    tokens, cfg = run.inputs["tokenize"], run.cfg
    counts = train.train(
        _splits(tokens, "train"),
        _splits(tokens, "val"),
        tokens.counts["vocab_size"],
        cfg.model,
        cfg.train,
        cfg.seed,
        run.ctx,
        mixture=_mixture(cfg, tokens),
        eot_id=tokens.counts["eot_id"],
    )
    return StageResult(extra=counts)


def _mixture(cfg: PipelineConfig, tokens: Manifest) -> dict[str, Any] | None:
    mixture = cfg.mixture()
    return mixture | {"ledger_files": [str(p) for p in tokens.files_under("ledger/")]} if mixture else None


def _train_params(cfg: PipelineConfig) -> dict[str, Any]:
    params = {
        "model": cfg.model.sizes(),
        "train": cfg.train.model_dump(exclude=set(cfg.train.PLACEMENT)),
        "seed": cfg.seed,
    }
    mixture = cfg.mixture()
    return params | {"mixture": mixture} if mixture else params  # unweighted runs keep their fingerprints


def _produce_evaluate(run: StageRun) -> StageResult:
    tokens, cfg = run.inputs["tokenize"], run.cfg
    counts = evaluate.evaluate(
        run.inputs["train"].file(""),
        run.inputs["tokenizer"].file(""),
        {s: _splits(tokens, s) for s in ("train", "val", "test")},
        tokens.counts["eot_id"],
        cfg.evaluate,
        cfg.seed,
        run.ctx,
        ledger_files=tokens.files_under("ledger/"),
    )
    return StageResult(extra=counts)


def _produce_export(run: StageRun) -> StageResult:
    model, tok = run.inputs["train"].file(""), run.inputs["tokenizer"].file("")
    return StageResult(extra=export.export_stage(model, tok, run.cfg.tokenizer.special_tokens, run.ctx))


SPECS: dict[str, StageSpec] = {
    "ingest": StageSpec("ingest", ingest.VERSION, _ingest_params, _produce_ingest),
    # the stage that first hashes content
    "clean": StageSpec(
        "clean", clean.VERSION, _clean_params, _produce_clean, ledger_links=("content_hash",), local_inputs=()
    ),
    "dedup": StageSpec("dedup", dedup.VERSION, dedup.stage_params, _produce_dedup, ledger_links=("duplicate_of",)),
    "tokenizer": StageSpec("tokenizer", tokenizer.VERSION, lambda c: c.tokenizer.model_dump(), _produce_tokenizer),
    "tokenize": StageSpec(
        "tokenize",
        tokenize.VERSION,
        _tokenize_params,
        _produce_tokenize,
        local_inputs=("tokenizer",),
    ),
    "train": StageSpec(
        "train",
        train.VERSION,
        _train_params,
        _produce_train,
    ),
    "evaluate": StageSpec(
        "evaluate", evaluate.VERSION, lambda c: c.evaluate.model_dump() | {"seed": c.seed}, _produce_evaluate
    ),
    # Its own stage (not part of evaluate): it depends only on weights and tokenizer, so changing evaluation
    # settings does not re-export, and a model can be exported without being evaluated.
    "export": StageSpec(
        "export", export.VERSION, lambda c: {"special_tokens": c.tokenizer.special_tokens}, _produce_export
    ),
}
assert set(SPECS) == set(STAGES)


def stage_key(name: str, cfg: PipelineConfig, inputs: dict[str, Manifest]) -> StageKey:
    """The stage's parameters and inputs — computed once per run, then used for cache key, build and lineage."""
    if name not in SPECS:
        raise UserError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    missing = [u for u in UPSTREAM[name] if u not in inputs]
    if missing:
        raise ValueError(f"stage {name!r} needs the artifacts of {missing}")
    spec = SPECS[name]
    return StageKey(
        stage=name, version=spec.version, params=spec.params(cfg), inputs=[inputs[u].ref() for u in UPSTREAM[name]]
    )


def cache_key(key: StageKey, root: str) -> str:
    """The Prefect cache key: the stage fingerprint, scoped to the data root (other roots don't share it)."""
    scope = hashlib.sha256(canonical_json(str(ArtifactStore(root).root)).encode()).hexdigest()[:8]
    return f"tokenmill-{key.stage}-{key.fingerprint}-{scope}"


def run_stage(
    name: str,
    cfg: PipelineConfig,
    inputs: dict[str, Manifest],
    *,
    key: StageKey | None = None,
    run_id: str | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    progress: Callable[[float, str], None] | None = None,
    should_stop: Callable[[int, float], bool] | None = None,
) -> tuple[Manifest, bool]:
    """Produce (or reuse) one stage's artifact. Returns ``(manifest, reused)``.

    ``key`` is the stage's ``stage_key`` when the caller already computed it (the flow does, for its cache key).
    ``should_stop(step, val_loss)`` is asked after each periodic validation of training (``StageContext``).
    """
    key = key or stage_key(name, cfg, inputs)
    spec = SPECS[name]
    store = ArtifactStore(cfg.root)
    for upstream in UPSTREAM[name]:
        store.verify(inputs[upstream], deep=False)
    require_documents(name, inputs)

    def produce(ctx: StageContext) -> dict[str, Any]:
        if should_stop is not None:
            ctx.should_stop = should_stop
        maybe_fail(name, "start")
        for upstream in UPSTREAM[name]:  # remote roots: a verified local copy of each input, downloaded once
            if spec.local_inputs is None or upstream in spec.local_inputs:
                store.materialize(inputs[upstream])
        with executor_for(cfg):
            result = spec.produce(StageRun(cfg, inputs, ctx))
        compact_ledger_folder(ctx.out_dir / "ledger", spec.ledger_links)
        maybe_fail(name, "end")
        return result.as_counts()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    return store.build(key, produce, run_id=run_id, force=force, log=log, progress=progress)


def run_all(cfg: PipelineConfig, log: Callable[[str], None] = print, run_id: str | None = None) -> dict[str, Manifest]:
    """Run every stage in order in this process, without Prefect, recording the run in lineage.

    The reference runner for tests and debugging; the Prefect flow does the same through tasks.
    """
    from datetime import UTC, datetime

    from storage.lineage import LineageStore
    from tasks.preflight import preflight
    from tasks.run_recorder import RunRecorder

    preflight(cfg)
    run_id = run_id or f"local-{datetime.now(UTC):%Y%m%d-%H%M%S-%f}"
    store = ArtifactStore(cfg.root)
    record = RunRecorder(LineageStore(store.lineage_path), run_id, backup=store.backup_lineage)
    record.start(cfg)
    manifests: dict[str, Manifest] = {}
    for name in STAGES:
        started = datetime.now(UTC)
        try:
            manifests[name], reused = run_stage(
                name, cfg, {u: manifests[u] for u in UPSTREAM[name]}, run_id=run_id, log=log
            )
        except BaseException as err:  # an interrupt too: the run is recorded as cancelled
            record.stage_failed(name, started, err)
            raise
        record.stage_done(name, started, manifests[name], reused)
    record.finish()
    return manifests
