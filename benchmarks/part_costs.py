"""Per-stage cost of the data stages on one core: the numbers docs/scaling.md scales to 1 TB / 100M documents.

Generates a JSONL corpus of unique prose documents (``benchmarks.ingest_clean``'s generator, every document
drawn afresh so dedup has real signing work), runs ingest → clean → dedup → tokenizer → tokenize through
``run_stage`` with ``workers=1`` in this process, and reports for each stage: wall and CPU seconds, input MB
and documents per CPU second, peak resident memory (sampled from /proc every 50 ms) and output bytes.

    PYTHONPATH=. python -m benchmarks.part_costs --mb 40 --json /tmp/part_costs.json

``--fanout`` then measures the fan-outs of dedup and tokenize on the same data, side by side in one run: the
CPU seconds of each part (``sign_part``, ``band_pairs``, ``verify_part``, ``tokenize_part``; timed inline, one
after the other) and each stage's wall time on a warm local Dask cluster of 1 and of 2 single-threaded worker
processes (fresh outputs each time). Dedup's input gets 10% light-edit copies so verification has pairs; the
dedup output is cut into ``--tokenize-parts`` shards so tokenize has parts to fan out over.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.ingest_clean import synthetic_doc
from storage.artifacts import StageContext
from tasks.config import PipelineConfig
from tasks.data import dedup, tokenize
from tasks.data.dedup import candidates, clusters, sign
from tasks.parts import DaskExecutor, use_executor
from tasks.stages import UPSTREAM, run_stage

DATA_STAGES = ("ingest", "clean", "dedup", "tokenizer", "tokenize")


def write_unique_corpus(folder: Path, total_mb: float, files: int, seed: int = 0) -> tuple[int, int]:
    """``files`` JSONL files of about ``total_mb`` MB of distinct documents; returns (documents, bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    docs = total = 0
    for f in range(files):
        written = 0
        with open(folder / f"part-{f:04d}.jsonl", "w") as fh:
            while written < total_mb * 1e6 / files:
                kind = int(rng.choice(4, p=[0.85, 0.05, 0.05, 0.05]))
                line = json.dumps({"text": synthetic_doc(rng, kind), "id": docs}) + "\n"
                fh.write(line)
                written += len(line)
                docs += 1
        total += written
    return docs, total


class PeakRss:
    """Peak resident memory of this process since the last ``reset``, sampled from /proc/self/status."""

    def __init__(self, interval: float = 0.05) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    @staticmethod
    def rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, self.rss())

    def reset(self) -> None:
        self.peak = self.rss()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(mb: float, files: int, work: Path, fanout: bool = False, tokenize_parts: int = 8) -> dict:
    n_docs, n_bytes = write_unique_corpus(work / "corpus", mb, files)
    cfg = PipelineConfig.model_validate(
        {
            "name": "part-costs",
            "root": str(work / "root"),
            "workers": 1,
            "sources": [{"name": "gen", "path": str(work / "corpus")}],
            "dedup": {"workers": 1},
            "tokenizer": {"vocab_size": 4096},
        }
    )
    rss = PeakRss()
    baseline = rss.rss()
    manifests: dict = {}
    stages: dict[str, dict] = {}
    for name in DATA_STAGES:
        rss.reset()
        wall, cpu = time.perf_counter(), time.process_time()
        manifests[name], _ = run_stage(name, cfg, {u: manifests[u] for u in UPSTREAM[name]}, log=lambda m: None)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        counts = manifests[name].counts
        stages[name] = {
            "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2),
            "docs_in": counts.get("docs_in"),
            "kept": counts.get("kept"),
            "corpus_mb_per_cpu_s": round(n_bytes / 1e6 / cpu, 2),
            "docs_in_per_cpu_s": round((counts.get("docs_in") or n_docs) / cpu, 1),
            "peak_rss_mib": round(rss.peak / 2**20, 1),
            "output_mb": round(_bytes_under(Path(manifests[name].path)) / 1e6, 2),
        }
    rss.stop()
    result = {
        "corpus_docs": n_docs,
        "corpus_mb": round(n_bytes / 1e6, 2),
        "baseline_rss_mib": round(baseline / 2**20, 1),
        "stages": stages,
    }
    if fanout:
        result["fanout"] = measure_fanout(cfg, manifests, work, tokenize_parts)
    return result


def _timed_parts(modules: dict[str, object]) -> tuple[ExitStack, dict[str, list[float]]]:
    """Replace ``map_parts`` in ``modules`` by an inline map that records each part's CPU seconds."""
    costs: dict[str, list[float]] = {}

    def timed(fn: Callable, parts, workers, on_done: Callable | None = None) -> list:
        out = []
        for part in parts:
            cpu = time.process_time()
            out.append(fn(part))
            costs.setdefault(fn.__name__, []).append(time.process_time() - cpu)
        return out

    stack = ExitStack()
    for module in modules.values():
        stack.enter_context(mock.patch.object(module, "map_parts", timed))
    return stack, costs


def _with_near_copies(clean_docs: list[Path], out: Path, share: float = 0.1) -> list[Path]:
    """The clean shards plus one shard of light edits (2% of words replaced) of ``share`` of the documents, so
    dedup's verification parts have pairs to check."""
    table = pq.read_table(clean_docs)
    rng = np.random.default_rng(1)
    picked = rng.choice(table.num_rows, int(table.num_rows * share), replace=False)
    rows = []
    for i in sorted(picked.tolist()):
        doc = table.slice(i, 1).to_pylist()[0]
        words = doc["text"].split(" ")
        for j in rng.choice(len(words), max(1, len(words) // 50), replace=False):
            words[j] = "edited"
        text = " ".join(words)
        rows.append(
            doc
            | {
                "doc_id": f"near-{doc['doc_id']}",
                "ordinal": doc["ordinal"] + table.num_rows,
                "text": text,
                "n_bytes": len(text.encode()),
                "content_hash": f"near-{doc['content_hash']}",
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), out / "near-copies.parquet")
    return [*clean_docs, out / "near-copies.parquet"]


def measure_fanout(cfg: PipelineConfig, manifests: dict, work: Path, tokenize_parts: int) -> dict:
    """Per-part CPU costs (inline) and the wall time of dedup and tokenize on a warm Dask cluster of 1 and of 2
    single-threaded worker processes (``RAYON_NUM_THREADS=1``: one core each), same inputs, one run."""
    from distributed import Client, LocalCluster

    clean_docs = _with_near_copies(manifests["clean"].files_under("docs/"), work / "near")
    table = pq.read_table(manifests["dedup"].files_under("docs/"))
    step = -(-table.num_rows // tokenize_parts)
    dedup_docs = []
    for k in range(tokenize_parts):
        dedup_docs.append(work / "split" / f"docs-{k:05d}.parquet")
        dedup_docs[-1].parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.slice(k * step, step), dedup_docs[-1])
    tok_dir = manifests["tokenizer"].file("")

    def run(stage: str, name: str) -> float:
        out = work / "fanout" / name
        shutil.rmtree(out, ignore_errors=True)
        ctx = StageContext(out / "out", out / "work", log=lambda m: None)
        ctx.out_dir.mkdir(parents=True)
        ctx.work_dir.mkdir(parents=True)
        wall = time.perf_counter()
        if stage == "dedup":
            dedup.dedup(clean_docs, cfg.dedup, ctx)
        else:
            tokenize.tokenize(dedup_docs, tok_dir, cfg.tokenizer, cfg.tokenize, ctx, workers=1)
        return round(time.perf_counter() - wall, 2)

    stack, costs = _timed_parts({"sign": sign, "candidates": candidates, "clusters": clusters, "tokenize": tokenize})
    with stack:
        inline = {stage: run(stage, f"inline-{stage}") for stage in ("dedup", "tokenize")}
    per_part = {
        fn: {"parts": len(c), "cpu_s_mean": round(float(np.mean(c)), 3), "cpu_s_max": round(max(c), 3)}
        for fn, c in costs.items()
    }
    walls: dict[str, dict[str, float]] = {"dedup": {}, "tokenize": {}}
    for n in (1, 2):
        kwargs = {"n_workers": n, "threads_per_worker": 1, "host": "127.0.0.1", "dashboard_address": None}
        cluster = LocalCluster(**kwargs, env={"RAYON_NUM_THREADS": "1"})
        with cluster, Client(cluster) as client, use_executor(DaskExecutor(client)):
            for stage in walls:
                run(stage, f"warm-{stage}-{n}")  # workers import and load the tokenizer once
                walls[stage][f"{n}_worker{'s' if n > 1 else ''}_wall_s"] = run(stage, f"{stage}-{n}")
    for w in walls.values():
        w["speedup"] = round(w["1_worker_wall_s"] / w["2_workers_wall_s"], 2)
    return {"parts": per_part, "inline_wall_s": inline, "dask": walls, "tokenize_input_shards": tokenize_parts}


def corpus_args(doc: str | None, default_mb: float) -> argparse.Namespace:
    """The options of the generated-corpus benchmarks: corpus size, files, and where to write the result."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=default_mb, help="Corpus size in MB (JSONL).")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None, help="Also write the result here.")
    parser.add_argument("--fanout", action="store_true", help="Also measure per-part costs and 1 → 2 speed-ups.")
    parser.add_argument("--tokenize-parts", type=int, default=8, help="Shards the dedup output is cut into.")
    return parser.parse_args()


def emit(result: dict, json_path: Path | None) -> None:
    """Print the result as JSON, and write it to ``json_path`` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        json_path.write_text(text + "\n")


def main() -> None:
    args = corpus_args(__doc__, default_mb=40.0)
    with tempfile.TemporaryDirectory(prefix="tokenmill-part-costs-") as tmp:
        emit(measure(args.mb, args.files, Path(tmp), args.fanout, args.tokenize_parts), args.json)


if __name__ == "__main__":
    main()
