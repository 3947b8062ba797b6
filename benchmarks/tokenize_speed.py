"""Tokenize-stage throughput against the raw tokenizers library, side by side in one run.

    python benchmarks/tokenize_speed.py --root /tmp/tokenize-bench [--config configs/quickstart.yaml]

Runs ingest → clean → dedup → tokenizer once (cached in --root), then times, on the same documents and the
same threads (RAYON_NUM_THREADS, default: all cores):
  raw     - read the texts into memory, then Tokenizer.encode_batch_fast in batches (the library's best case);
  stage   - tokenmill's whole tokenize stage: read Parquet, encode, split, pack, write shards and the ledger.
Also times the training loader alone (windows/s for the configured block and batch size) so it can be set
against what training consumes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from storage.artifacts import StageContext
from storage.shards import iter_batches
from tasks.config import PipelineConfig
from tasks.data.tokenize import tokenize
from tasks.data.tokenizer import load_tokenizer
from tasks.stages import UPSTREAM, run_stage
from tasks.training.loader import TokenWindows, WindowSampler


def prepare(cfg: PipelineConfig) -> dict:
    manifests = {}
    for name in ("ingest", "clean", "dedup", "tokenizer"):
        manifests[name], _ = run_stage(name, cfg, {u: manifests[u] for u in UPSTREAM[name]}, log=lambda m: None)
    return manifests


def raw_encode(doc_paths: list[Path], tokenizer_dir: Path, batch: int) -> tuple[float, int]:
    tokenizer = load_tokenizer(tokenizer_dir)
    texts = [t for b in iter_batches(doc_paths, columns=["text"]) for t in b.column("text").to_pylist()]
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(texts), batch):
        n += sum(len(e.ids) + 1 for e in tokenizer.encode_batch_fast(texts[i : i + batch], add_special_tokens=False))
    return time.perf_counter() - t0, n


def stage_encode(cfg: PipelineConfig, manifests: dict, work: Path) -> tuple[float, int]:
    out = work / "stage-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    counts = tokenize(
        manifests["dedup"].files_under("docs/"),
        Path(manifests["tokenizer"].path),
        cfg.tokenizer,
        cfg.tokenize,
        StageContext(out_dir=out, work_dir=work),
    )
    elapsed = time.perf_counter() - t0
    return elapsed, counts["tokens"], out


def loader_rate(shards: list[Path], block: int, batch: int, seconds: float = 3.0) -> float:
    windows = TokenWindows(shards, block)
    sampler = WindowSampler(len(windows), seed=0)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        windows.batch(sampler.next(batch))
        n += batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"))
    parser.add_argument("--root", type=Path, default=Path("/tmp/tokenmill-tokenize-bench"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = PipelineConfig.from_yaml(args.config, root=str(args.root))
    manifests = prepare(cfg)
    docs = manifests["dedup"].files_under("docs/")
    rows = []
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        raw_s, raw_tokens = raw_encode(docs, Path(manifests["tokenizer"].path), cfg.tokenize.batch_docs)
        stage_s, stage_tokens, out = stage_encode(cfg, manifests, args.root / ".bench")
        assert raw_tokens == stage_tokens, (raw_tokens, stage_tokens)
        rows.append((raw_tokens / raw_s, stage_tokens / stage_s))
    raw_rate = float(np.median([r[0] for r in rows]))
    stage_rate = float(np.median([r[1] for r in rows]))
    shards = sorted((out / "tokens").glob("train-*.arrow"))
    windows_per_s = loader_rate(shards, cfg.model.block_size, cfg.train.batch_size)
    print(
        json.dumps(
            {
                "documents": manifests["dedup"].counts["kept"],
                "tokens": raw_tokens,
                "raw_encode_batch_tokens_per_s": round(raw_rate),
                "tokenize_stage_tokens_per_s": round(stage_rate),
                "stage_over_raw": round(stage_rate / raw_rate, 3),
                "loader_windows_per_s": round(windows_per_s),
                "loader_tokens_per_s": round(windows_per_s * cfg.model.block_size),
                "block_size": cfg.model.block_size,
                "batch_size": cfg.train.batch_size,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
