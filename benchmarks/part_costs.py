"""Per-stage cost of the data stages on one core: the numbers docs/scaling.md scales to 1 TB / 100M documents.

Generates a JSONL corpus of unique prose documents (``benchmarks.ingest_clean``'s generator, every document
drawn afresh so dedup has real signing work), runs ingest → clean → dedup → tokenizer → tokenize through
``run_stage`` with ``workers=1`` in this process, and reports for each stage: wall and CPU seconds, input MB
and documents per CPU second, peak resident memory (sampled from /proc every 50 ms) and output bytes.

    PYTHONPATH=. python -m benchmarks.part_costs --mb 40 --json /tmp/part_costs.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.ingest_clean import synthetic_doc
from tasks.config import PipelineConfig
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


def measure(mb: float, files: int, work: Path) -> dict:
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
    return {
        "corpus_docs": n_docs,
        "corpus_mb": round(n_bytes / 1e6, 2),
        "baseline_rss_mib": round(baseline / 2**20, 1),
        "stages": stages,
    }


def corpus_args(doc: str | None, default_mb: float) -> argparse.Namespace:
    """The options of the generated-corpus benchmarks: corpus size, files, and where to write the result."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=default_mb, help="Corpus size in MB (JSONL).")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None, help="Also write the result here.")
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
        emit(measure(args.mb, args.files, Path(tmp)), args.json)


if __name__ == "__main__":
    main()
