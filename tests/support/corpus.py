"""Test data builders: a tiny synthetic corpus with known defects, JSONL corpora, and a fast config."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from tasks.config import PipelineConfig

WORDS = (
    "the quick brown fox jumps over lazy dogs while data engineers build pipelines that train small language "
    "models on clean corpora with careful lineage tracking and deterministic shards"
).split(" ")


def prose(seed: int, n_words: int = 120) -> str:
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ".")
    return "\n".join(lines) + "\n"


def code_text(seed: int) -> str:
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
        (docs / f"prose_{i:02d}.txt").write_text(prose(i))
    for i in range(12):
        (docs / "nested" / f"mod_{i:02d}.py").write_text(code_text(i))
    (docs / "nested" / "deeper" / "copy_of_prose_03.txt").write_text(prose(3))  # exact duplicate
    (docs / "crlf_copy_of_prose_04.md").write_bytes(prose(4).replace("\n", "\r\n").encode())  # dup after normalize
    (docs / "empty.txt").write_text("")
    (docs / "short.txt").write_text("too short")
    (docs / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00binary")
    (docs / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 20)
    (docs / "ignored.bin").write_bytes(b"not listed by extension")
    jsonl = root / "records.jsonl.gz"
    lines = [json.dumps({"text": prose(100 + i), "id": i}) for i in range(10)]
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


def write_prose_jsonl(folder: Path, files: int = 6, docs_per_file: int = 20) -> Path:
    """``files`` JSONL files of distinct prose documents (enough parts to exercise fan-out)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        lines = (json.dumps({"text": prose(10 * i + j)}) + "\n" for j in range(docs_per_file))
        (folder / f"part{i}.jsonl").write_text("".join(lines))
    return folder
