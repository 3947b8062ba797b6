"""The pipeline's stage graph, as pure data: the one place that names the stages and their edges.

It lives in ``storage`` — the lowest layer — and imports nothing, so every layer (storage's lineage
questions, the stage specs in ``tasks``, the flows, the CLI and the deployments) reads the same graph.
"""

from __future__ import annotations

from typing import Literal, get_args

StageName = Literal["ingest", "clean", "dedup", "tokenizer", "tokenize", "train", "evaluate", "export"]
STAGES: tuple[str, ...] = get_args(StageName)

# Each stage's inputs: the artifacts it reads, in the order its fingerprint hashes them.
UPSTREAM: dict[str, tuple[str, ...]] = {
    "ingest": (),
    "clean": ("ingest",),
    "dedup": ("clean",),
    "tokenizer": ("dedup",),
    "tokenize": ("dedup", "tokenizer"),
    "train": ("tokenize",),
    "evaluate": ("train", "tokenizer", "tokenize"),
    "export": ("train", "tokenizer"),
}

# Where each stage's code lives (named in OpenLineage job facets).
STAGE_MODULES: dict[str, str] = {
    "ingest": "tasks/data/ingest.py",
    "clean": "tasks/data/clean.py",
    "dedup": "tasks/data/dedup/",
    "tokenizer": "tasks/data/tokenizer.py",
    "tokenize": "tasks/data/tokenize.py",
    "train": "tasks/training/train.py",
    "evaluate": "tasks/evaluation/evaluate.py",
    "export": "tasks/modeling/export.py",
}

# Stages whose artifacts carry a per-document ledger, in the order a document passes them.
LEDGER_STAGES: tuple[str, ...] = ("ingest", "clean", "dedup", "tokenize")
# The data stages: everything before training (what a data refresh or a worker cluster builds).
DATA_STAGES: tuple[str, ...] = ("ingest", "clean", "dedup", "tokenizer", "tokenize")


def downstream(name: str) -> tuple[str, ...]:
    """The stage and every stage that (transitively) reads its output, in pipeline order."""
    if name not in UPSTREAM:
        raise KeyError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    affected = {name}
    for stage in STAGES:
        if affected & set(UPSTREAM[stage]):
            affected.add(stage)
    return tuple(s for s in STAGES if s in affected)


DOWNSTREAM: dict[str, tuple[str, ...]] = {stage: downstream(stage) for stage in STAGES}

assert set(UPSTREAM) == set(STAGES) == set(STAGE_MODULES) and all(set(u) <= set(STAGES) for u in UPSTREAM.values())
