"""Shared fixtures: a tiny synthetic corpus with known defects, a fast config, an isolated Prefect."""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

import pytest

# Isolate Prefect before anything imports it: own home, no telemetry, a patient ephemeral server.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="tokenmill-prefect-home-"))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from tasks.config import PipelineConfig  # noqa: E402

WORDS = (
    "the quick brown fox jumps over lazy dogs while data engineers build pipelines that train small language "
    "models on clean corpora with careful lineage tracking and deterministic shards"
).split(" ")


def _prose(seed: int, n_words: int = 120) -> str:
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ".")
    return "\n".join(lines) + "\n"


def _code(seed: int) -> str:
    """A small Python module; names and docstrings vary by seed so modules are not near-duplicates."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(8):
        name = "_".join(rng.sample(WORDS, 3))
        doc = " ".join(rng.choice(WORDS) for _ in range(8)).capitalize()
        a, b = rng.sample(WORDS, 2)
        out.append(f'def {name}({a}, {b}):\n    """{doc}."""\n    return {a} + {b}\n\n\n')
    return "".join(out)


def write_corpus(root: Path) -> dict[str, int]:
    """Write a small corpus with known defects; return how many records of each kind it has."""
    docs = root / "docs"
    (docs / "nested" / "deeper").mkdir(parents=True)
    for i in range(24):
        (docs / f"prose_{i:02d}.txt").write_text(_prose(i))
    for i in range(12):
        (docs / "nested" / f"mod_{i:02d}.py").write_text(_code(i))
    (docs / "nested" / "deeper" / "copy_of_prose_03.txt").write_text(_prose(3))  # exact duplicate
    (docs / "crlf_copy_of_prose_04.md").write_bytes(_prose(4).replace("\n", "\r\n").encode())  # dup after normalize
    (docs / "empty.txt").write_text("")
    (docs / "short.txt").write_text("too short")
    (docs / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00binary")
    (docs / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 20)
    (docs / "ignored.bin").write_bytes(b"not listed by extension")
    jsonl = root / "records.jsonl.gz"
    lines = [json.dumps({"text": _prose(100 + i), "id": i}) for i in range(10)]
    lines += ["{not json", json.dumps({"body": "no text field"})]
    with gzip.open(jsonl, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    return {
        "records": 24 + 12 + 2 + 4 + 12,
        "binary": 1,
        "invalid_utf8": 1,
        "malformed_json": 1,
        "missing_text_field": 1,
    }


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    write_corpus(folder)
    return folder


def tiny_config(corpus: Path, root: Path, **overrides: object) -> PipelineConfig:
    data = {
        "name": "tiny",
        "root": str(root),
        "sources": [
            {"name": "docs", "path": str(corpus / "docs")},
            {"name": "records", "path": str(corpus / "records.jsonl.gz")},
        ],
        "clean": {"min_chars": 32},
        "tokenizer": {"vocab_size": 300, "min_frequency": 2, "holdout_fraction": 0.2},
        "tokenize": {"val_fraction": 0.15, "test_fraction": 0.15},
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
        "train": {
            "max_steps": 6,
            "batch_size": 4,
            "warmup_steps": 2,
            "eval_interval": 3,
            "eval_batches": 2,
            "checkpoint_interval": 2,
            "threads": 1,
        },
        "evaluate": {"batch_size": 8, "samples": 1, "sample_tokens": 8},
    }
    for key, value in overrides.items():
        section = data.setdefault(key, {})
        if isinstance(value, dict) and isinstance(section, dict):
            section.update(value)
        else:
            data[key] = value
    return PipelineConfig.model_validate(data)


@pytest.fixture
def config(corpus: Path, tmp_path: Path) -> PipelineConfig:
    return tiny_config(corpus, tmp_path / "root")


@pytest.fixture(scope="session")
def prefect_harness():
    """One ephemeral Prefect API server for the session's flow tests (≈20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def dask_cluster():
    """A local Dask cluster of 2 worker processes on 127.0.0.1 (≈3 s to start), closed after the module."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        yield cluster


def write_prose_jsonl(folder: Path, files: int = 6, docs_per_file: int = 20) -> Path:
    """``files`` JSONL files of distinct prose documents (enough parts to exercise fan-out)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        lines = (json.dumps({"text": _prose(10 * i + j)}) + "\n" for j in range(docs_per_file))
        (folder / f"part{i}.jsonl").write_text("".join(lines))
    return folder
