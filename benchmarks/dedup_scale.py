"""Per-phase cost and peak memory of the dedup stage at 100k and 1M synthetic documents.

    python -m benchmarks.dedup_scale --docs 100000 1000000 --workers 2

Documents are short Zipf-distributed word sequences (60–140 words, like web snippets), generated with NumPy
so that a million of them take seconds; 3% are exact copies and 10% light edits of earlier documents. Each
size runs the stage in a fresh subprocess, which reports its phase timings and the peak resident memory of
itself and of its signing workers (``getrusage``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import xxhash

CHUNK = 100_000


def generate(n_docs: int, folder: Path, seed: int = 0) -> list[Path]:
    """Write ``n_docs`` clean-stage-shaped documents as Parquet shards of 100k rows."""
    from storage.shards import ParquetShardWriter
    from tasks.data.clean import CLEAN_SCHEMA

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = np.array(["".join(rng.choice(letters, rng.integers(2, 11))) for _ in range(50_000)], dtype=object)
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.07
    p /= p.sum()
    history: list[str] = []
    with ParquetShardWriter(folder, "docs", CLEAN_SCHEMA, rows_per_shard=CHUNK) as writer:
        for start in range(0, n_docs, CHUNK):
            n = min(CHUNK, n_docs - start)
            lengths = rng.integers(60, 141, n)
            ids = rng.choice(len(vocab), int(lengths.sum()), p=p)
            words = vocab[ids]
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            texts = [" ".join(words[bounds[i] : bounds[i + 1]]) for i in range(n)]
            kind = rng.random(n)
            for i in range(1, n):
                if kind[i] < 0.13:  # a copy of an earlier document: this chunk's or a sample of earlier chunks'
                    j = int(rng.integers(i + len(history)))
                    source = texts[j] if j < i else history[j - i]
                    if kind[i] < 0.03:
                        texts[i] = source
                    else:
                        tokens = source.split(" ")
                        for j in rng.integers(0, len(tokens), max(1, len(tokens) // 50)):
                            tokens[j] = vocab[int(rng.integers(len(vocab)))]
                        texts[i] = " ".join(tokens)
            history.extend(texts[:: max(1, n // 5000)])
            table = pa.table(
                {
                    "doc_id": [f"d{start + i:09d}" for i in range(n)],
                    "source": ["synthetic"] * n,
                    "locator": [f"d{start + i:09d}" for i in range(n)],
                    "ordinal": np.arange(start, start + n),
                    "text": pa.array(texts, pa.large_string()),
                    "n_bytes": [len(t) for t in texts],
                    "content_hash": [xxhash.xxh3_128_hexdigest(t.encode()) for t in texts],
                },
                schema=CLEAN_SCHEMA,
            )
            writer.write(table)
    return writer.paths


def run_once(folder: Path, out: Path, workers: int) -> dict:
    """Run the stage on every shard in ``folder`` (in this process) and report timings and peak memory."""
    from storage.artifacts import StageContext
    from tasks.config import DedupConfig
    from tasks.data.dedup import dedup

    paths = sorted(folder.glob("*.parquet"))
    ctx = StageContext(out_dir=out / "out", work_dir=out / "work", log=lambda m: None)
    ctx.out_dir.mkdir(parents=True)
    ctx.work_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    counts = dedup(paths, DedupConfig(workers=workers), ctx)
    elapsed = time.perf_counter() - t0
    work_bytes = sum(f.stat().st_size for f in ctx.work_dir.rglob("*") if f.is_file())
    out_bytes = sum(f.stat().st_size for f in ctx.out_dir.rglob("*") if f.is_file())
    index_bytes = sum(f.stat().st_size for f in (ctx.out_dir / "index").rglob("*") if f.is_file())
    return {
        "docs": counts["docs_in"],
        "seconds": round(elapsed, 1),
        "docs_per_s": round(counts["docs_in"] / elapsed),
        "phases_s": counts["timings_s"],
        "dropped": counts["dropped"],
        "candidate_pairs": counts["near_duplicates"]["candidate_pairs"],
        "cpu_s_main": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 1),
        "cpu_s_workers": round(sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2]), 1),
        "peak_rss_main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "peak_rss_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024,
        "work_disk_mib": round(work_bytes / 2**20, 1),
        "output_mib": round(out_bytes / 2**20, 1),
        "index_mib": round(index_bytes / 2**20, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--run", type=Path, help=argparse.SUPPRESS)  # internal: run one size in this process
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.run:
        print("RESULT " + json.dumps(run_once(args.run / "docs", args.run / "stage", args.workers)))
        return
    results = []
    for n in args.docs:
        with tempfile.TemporaryDirectory(prefix="dedup-scale-") as tmp:
            t0 = time.perf_counter()
            paths = generate(n, Path(tmp) / "docs")
            input_mib = sum(p.stat().st_size for p in paths) / 2**20
            print(f"{n} docs generated in {time.perf_counter() - t0:.0f}s ({input_mib:.0f} MiB Parquet)", flush=True)
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.dedup_scale", "--run", tmp, "--workers", str(args.workers)],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                sys.exit(proc.stderr[-4000:])
            result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
            result["input_mib"] = round(input_mib, 1)
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
