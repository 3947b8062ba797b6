"""The stages bound to the artifact store: parameters, inputs and the function that produces each.

This is the one place that knows which configuration section and which upstream artifacts each stage
reads. It has no Prefect import: the CLI, the Prefect tasks and tests all call ``run_stage``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from storage.artifacts import ArtifactStore, Manifest, StageContext
from storage.faults import maybe_fail
from storage.hashing import canonical_json, fingerprint
from storage.ledger import compact_ledger_folder
from storage.stage_graph import DOWNSTREAM, STAGES, UPSTREAM, StageName, downstream  # noqa: F401 (re-exported)
from tasks.config import PipelineConfig
from tasks.data import clean, dedup, ingest, tokenize, tokenizer
from tasks.evaluation import evaluate
from tasks.modeling import export
from tasks.parts import executor_for
from tasks.training import train


@dataclass(frozen=True)
class StageSpec:
    name: str
    version: str
    params: Callable[[PipelineConfig], dict[str, Any]]
    produce: Callable[[PipelineConfig, dict[str, Manifest], StageContext], dict[str, Any]]
    ledger_links: tuple[str, ...] = ()  # ledger columns indexed for reverse lookup (lineage takedown)


def _source_snapshot(cfg: PipelineConfig) -> dict[str, Any]:
    """What ingest reads, cheaply: every listed file's relative path, size and mtime. Changes rerun ingest."""
    snapshot = {}
    for source in cfg.sources:
        digest = hashlib.sha256()
        for f in ingest.list_files(source):
            digest.update(f"{f.rel}\x1f{f.size}\x1f{f.mtime}\x1f{f.error}\n".encode())
        snapshot[source.name] = digest.hexdigest()
    return snapshot


_SECRET_OPTION = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)


def _redacted(options: Any) -> Any:
    """fsspec options without credentials (access keys, tokens): they must not reach manifests or lineage."""
    if isinstance(options, dict):
        return {k: "<redacted>" if _SECRET_OPTION.search(str(k)) else _redacted(v) for k, v in options.items()}
    return options


def _ingest_params(cfg: PipelineConfig) -> dict[str, Any]:
    sources = [s.model_dump() | {"storage_options": _redacted(s.storage_options)} for s in cfg.sources]
    return {"sources": sources, "snapshot": _source_snapshot(cfg)}


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
    params = cfg.clean.model_dump()
    blocked = _tombstones(cfg)
    if blocked:  # only present when there are takedowns, so fingerprints of ordinary runs stay unchanged
        params["tombstones"] = hashlib.sha256("\n".join(blocked).encode()).hexdigest()
    return params


def _splits(m: Manifest, split: str) -> list:
    return m.files_under(f"tokens/{split}-", ".arrow")


SPECS: dict[str, StageSpec] = {
    "ingest": StageSpec(
        "ingest",
        ingest.VERSION,
        _ingest_params,
        lambda c, i, ctx: ingest.ingest(c.sources, ctx, ArtifactStore(c.root).cache_dir("ingest"), c.workers),
    ),
    "clean": StageSpec(
        "clean",
        clean.VERSION,
        _clean_params,
        lambda c, i, ctx: clean.clean(
            i["ingest"].files_under("docs/"), c.clean, ctx, workers=c.workers, blocked=set(_tombstones(c))
        ),
        ledger_links=("content_hash",),  # the stage that first hashes content
    ),
    "dedup": StageSpec(
        "dedup",
        dedup.VERSION,
        dedup.stage_params,
        lambda c, i, ctx: dedup.dedup(
            i["clean"].files_under("docs/"), c.dedup, ctx, previous=dedup.resolve_previous(c.dedup.against, c.root)
        ),
        ledger_links=("duplicate_of",),
    ),
    "tokenizer": StageSpec(
        "tokenizer",
        tokenizer.VERSION,
        lambda c: c.tokenizer.model_dump(),
        lambda c, i, ctx: tokenizer.train_tokenizer(i["dedup"].files_under("docs/"), c.tokenizer, ctx),
    ),
    "tokenize": StageSpec(
        "tokenize",
        tokenize.VERSION,
        lambda c: c.tokenize.model_dump() | {"eot": c.tokenizer.special_tokens[0]},
        lambda c, i, ctx: tokenize.tokenize(
            i["dedup"].files_under("docs/"), i["tokenizer"].file(""), c.tokenizer, c.tokenize, ctx
        ),
    ),
    "train": StageSpec(
        "train",
        train.VERSION,
        lambda c: {
            "model": c.model.sizes(),
            "train": c.train.model_dump(exclude=set(c.train.PLACEMENT)),
            "seed": c.seed,
        },
        lambda c, i, ctx: train.train(
            _splits(i["tokenize"], "train"),
            _splits(i["tokenize"], "val"),
            i["tokenize"].counts["vocab_size"],
            c.model,
            c.train,
            c.seed,
            ctx,
            eot_id=i["tokenize"].counts["eot_id"],
        ),
    ),
    "evaluate": StageSpec(
        "evaluate",
        evaluate.VERSION,
        lambda c: c.evaluate.model_dump() | {"seed": c.seed},
        lambda c, i, ctx: evaluate.evaluate(
            i["train"].file(""),
            i["tokenizer"].file(""),
            {s: _splits(i["tokenize"], s) for s in ("train", "val", "test")},
            i["tokenize"].counts["eot_id"],
            c.evaluate,
            c.seed,
            ctx,
            ledger_files=i["tokenize"].files_under("ledger/"),
        ),
    ),
    # Its own stage (not part of evaluate): it depends only on weights and tokenizer, so changing evaluation
    # settings does not re-export, and a model can be exported without being evaluated.
    "export": StageSpec(
        "export",
        export.VERSION,
        lambda c: {"special_tokens": c.tokenizer.special_tokens},
        lambda c, i, ctx: export.export_stage(
            i["train"].file(""), i["tokenizer"].file(""), c.tokenizer.special_tokens, ctx
        ),
    ),
}


def stage_fingerprint(name: str, cfg: PipelineConfig, inputs: dict[str, Manifest]) -> str:
    spec = SPECS[name]
    return fingerprint(name, spec.version, spec.params(cfg), [inputs[u].content_hash for u in UPSTREAM[name]])


def cache_key(name: str, cfg: PipelineConfig, inputs: dict[str, Manifest]) -> str:
    """The Prefect cache key: the stage fingerprint, scoped to the data root (other roots don't share it)."""
    root = hashlib.sha256(canonical_json(str(ArtifactStore(cfg.root).root)).encode()).hexdigest()[:8]
    return f"tokenmill-{name}-{stage_fingerprint(name, cfg, inputs)}-{root}"


def run_stage(
    name: str,
    cfg: PipelineConfig,
    inputs: dict[str, Manifest],
    *,
    run_id: str | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    progress: Callable[[float, str], None] | None = None,
) -> tuple[Manifest, bool]:
    """Produce (or reuse) one stage's artifact. Returns ``(manifest, reused)``."""
    if name not in SPECS:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    missing = [u for u in UPSTREAM[name] if u not in inputs]
    if missing:
        raise ValueError(f"stage {name!r} needs the artifacts of {missing}")
    spec = SPECS[name]
    store = ArtifactStore(cfg.root)
    for upstream in UPSTREAM[name]:
        store.verify(inputs[upstream], deep=False)

    def produce(ctx: StageContext) -> dict[str, Any]:
        maybe_fail(name, "start")
        for upstream in UPSTREAM[name]:  # remote roots: a verified local copy of each input, downloaded once
            store.materialize(inputs[upstream])
        with executor_for(cfg):
            counts = spec.produce(cfg, inputs, ctx)
        compact_ledger_folder(ctx.out_dir / "ledger", spec.ledger_links)
        maybe_fail(name, "end")
        return counts

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    return store.build(
        name,
        spec.version,
        spec.params(cfg),
        [inputs[u] for u in UPSTREAM[name]],
        produce,
        run_id=run_id,
        force=force,
        log=log,
        progress=progress,
    )


def run_all(cfg: PipelineConfig, log: Callable[[str], None] = print, run_id: str | None = None) -> dict[str, Manifest]:
    """Run every stage in order in this process, without Prefect, recording the run in lineage.

    The reference runner for tests and debugging; the Prefect flow does the same through tasks.
    """
    from datetime import UTC, datetime

    from storage.lineage import LineageStore

    run_id = run_id or f"local-{datetime.now(UTC):%Y%m%d-%H%M%S-%f}"
    lineage = LineageStore(ArtifactStore(cfg.root).lineage_path)
    lineage.start_run(run_id, cfg.name, cfg.model_dump(), cfg.seed, None)
    manifests: dict[str, Manifest] = {}
    for name in STAGES:
        started = datetime.now(UTC)
        try:
            manifests[name], reused = run_stage(
                name, cfg, {u: manifests[u] for u in UPSTREAM[name]}, run_id=run_id, log=log
            )
        except Exception as err:
            lineage.record_stage(run_id, name, "failed", started, error=f"{type(err).__name__}: {err}")
            lineage.finish_run(run_id, "failed", f"{name}: {err}")
            raise
        lineage.record_stage(run_id, name, "cached" if reused else "completed", started, manifest=manifests[name])
    lineage.finish_run(run_id, "completed")
    return manifests
