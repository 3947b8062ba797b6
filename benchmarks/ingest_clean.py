"""Ingest + clean throughput, side by side with datatrove on the same generated JSONL corpus and worker count.

tokenmill: ``tasks.data.ingest.ingest`` then ``tasks.data.clean.clean`` (Gopher quality + Gopher repetition enabled,
C4/PII/code filters off, normalization and hashing on — tokenmill's own extra work), Parquet out.
datatrove: ``JsonlReader`` → ``GopherQualityFilter`` → ``GopherRepetitionFilter`` → ``JsonlWriter``
(uncompressed), one task per input file, run by ``--datatrove-python`` (its own venv; never a tokenmill
dependency). Each side runs in its own process tree; the peak resident memory of the whole tree (sum over
processes, sampled from /proc every 0.1 s) is reported with the wall time.

    python benchmarks/ingest_clean.py --datatrove-python /work/bench/datatrove-venv/bin/python \\
        --mb 200 --files 8 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

_VOCAB_TEXT = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more can about said what out up "
    "its into them than only other time new some could these two may first then do any like my now over such our "
    "man me even most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old year off come since "
    "against go came right used take three pipeline corpus token model data training quality filter repetition "
    "document language research engineer system process result measure method analysis structure evidence"
)
_VOCAB = _VOCAB_TEXT.split()


_WEIGHTS = 1.0 / (np.arange(len(_VOCAB)) + 8.0)
_WEIGHTS /= _WEIGHTS.sum()


def synthetic_doc(rng: np.random.Generator, kind: int) -> str:
    """Mostly natural-looking prose; some documents repetitive, short or list-like, so filters have work to do."""
    vocab = _VOCAB
    n = int(rng.integers(80, 1200))
    words = [vocab[i] for i in rng.choice(len(vocab), n, p=_WEIGHTS)]
    if kind == 1:  # repetitive boilerplate
        block = words[:40]
        words = block * (n // 40 + 1)
    elif kind == 2:  # too short
        words = words[:20]
    sentences, i = [], 0
    while i < len(words):
        k = int(rng.integers(6, 20))
        sentences.append(" ".join(words[i : i + k]).capitalize() + ".")
        i += k
    if kind == 3:  # bullet list
        return "\n".join(f"- {s}" for s in sentences)
    paragraphs = [" ".join(sentences[j : j + 5]) for j in range(0, len(sentences), 5)]
    return "\n\n".join(paragraphs)


def generate_corpus(folder: Path, total_mb: float, files: int, seed: int = 0) -> tuple[int, int]:
    """Write ``files`` JSONL files of about ``total_mb`` MB in all; return (documents, bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    target = total_mb * 1e6 / files
    pool = [
        json.dumps({"text": synthetic_doc(rng, int(k)), "id": i})
        for i, k in enumerate(rng.choice(4, 2000, p=[0.85, 0.05, 0.05, 0.05]))
    ]
    docs = total = 0
    for f in range(files):
        written = 0
        with open(folder / f"part-{f:04d}.jsonl", "w") as fh:
            while written < target:
                # vary each pooled document (shuffle its id and one word) so files are not byte-identical
                line = pool[int(rng.integers(len(pool)))].replace('"id": ', f'"id": {docs}0', 1) + "\n"
                fh.write(line)
                written += len(line)
                docs += 1
        total += written
    return docs, total


class TreeMonitor:
    """Peak RSS summed over a process and all its descendants, and their CPU seconds, sampled from /proc.

    CPU time is the sum over every process seen in the tree of its last sampled utime + stime (a process
    that ends between two samples loses at most one interval); rusage cannot be used because pool workers
    forked by a forkserver are not reaped into their parent's rusage.
    """

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval, self.peak = pid, interval, 0
        self.cpu_ticks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        children: dict[int, list[int]] = {}
        stats: dict[int, tuple[int, int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
            stats[int(entry)] = (int(fields[21]) * PAGE, int(fields[11]) + int(fields[12]))
        rss, stack = 0, [self.pid]
        while stack:
            p = stack.pop()
            if p in stats:
                rss += stats[p][0]
                self.cpu_ticks[p] = max(self.cpu_ticks.get(p, 0), stats[p][1])
            stack.extend(children.get(p, []))
        self.peak = max(self.peak, rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def stop(self) -> tuple[int, float]:
        self._stop.set()
        self._thread.join()
        return self.peak, sum(self.cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")


PAGE = os.sysconf("SC_PAGE_SIZE")


def _run_measured(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float, int, str]:
    """Run a command; return (wall seconds, CPU seconds of its process tree, peak tree RSS, output).

    CPU seconds are the fairer measure on a shared machine, where wall time also counts waiting for a core.
    """
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    monitor = TreeMonitor(proc.pid)
    out, _ = proc.communicate()
    elapsed = time.perf_counter() - started
    peak, cpu = monitor.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{out[-4000:]}")
    return elapsed, cpu, peak, out


TOKENMILL_SCRIPT = """
import json, sys
from pathlib import Path
from storage.artifacts import StageContext
from tasks.data.clean import clean
from tasks.config import CleanConfig, SourceConfig
from tasks.data.ingest import ingest
corpus, out, workers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
source = SourceConfig(name="bench", path=str(corpus), kind="jsonl")
cfg = CleanConfig(
    min_chars=0, fix_mojibake=True, pii={"enabled": False}, default_preset="bench",
    presets={"bench": {"gopher_quality": {"enabled": True}, "gopher_repetition": {"enabled": True}}},
)
quiet = lambda message: None
ingest_ctx = StageContext(out / "ingest", out / "ingest-work", log=quiet)
counts = ingest([source], ingest_ctx, workers=workers)
docs = sorted((out / "ingest" / "docs").glob("*.parquet"))
clean_counts = clean(docs, cfg, StageContext(out / "clean", out / "clean-work", log=quiet), workers=workers)
print(json.dumps({"docs_in": counts["docs_in"], "kept": clean_counts["kept"], "dropped": clean_counts["dropped"]}))
"""

DATATROVE_SCRIPT = """
import json, sys
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
corpus, out, workers, files = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if __name__ == "__main__":
    executor = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(corpus, glob_pattern="*.jsonl", doc_progress=False),
            GopherQualityFilter(),
            GopherRepetitionFilter(),
            JsonlWriter(out + "/kept", compression=None),
        ],
        tasks=files, workers=workers, logging_dir=out + "/logs",
    )
    stats = executor.run()
    print(json.dumps({"stats": str(stats)[-2000:]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datatrove-python", default=None, help="Python of a venv with datatrove installed.")
    parser.add_argument("--mb", type=float, default=100.0, help="Corpus size in MB (JSONL).")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="Scratch folder (default: a temporary one).")
    parser.add_argument("--skip-datatrove", action="store_true")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="tokenmill-bench-"))
    corpus = work / "corpus"
    t0 = time.perf_counter()
    n_docs, n_bytes = generate_corpus(corpus, args.mb, args.files)
    print(f"corpus: {n_docs} docs, {n_bytes / 1e6:.1f} MB in {args.files} files ({time.perf_counter() - t0:.1f} s)")

    results = {}
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    shutil.rmtree(work / "tokenmill", ignore_errors=True)
    cmd = [sys.executable, "-c", TOKENMILL_SCRIPT, str(corpus), str(work / "tokenmill"), str(args.workers)]
    elapsed, cpu, peak, out = _run_measured(cmd, env, ROOT)
    results["tokenmill"] = (elapsed, cpu, peak, json.loads(out.strip().splitlines()[-1]))
    if args.datatrove_python and not args.skip_datatrove:
        shutil.rmtree(work / "datatrove", ignore_errors=True)
        dt_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        cmd = [args.datatrove_python, "-c", DATATROVE_SCRIPT, str(corpus), str(work / "datatrove")]
        elapsed, cpu, peak, out = _run_measured(cmd + [str(args.workers), str(args.files)], dt_env, work)
        kept = 0
        for path in (work / "datatrove" / "kept").glob("*.jsonl"):
            with open(path) as fh:
                kept += sum(1 for _ in fh)
        results["datatrove"] = (elapsed, cpu, peak, {"kept": kept})

    print(
        f"\n{'pipeline':<10} {'wall s':>8} {'CPU s':>8} {'docs/s':>9} {'MB/s':>7} {'MB/CPU-s':>9} "
        f"{'peak RSS MB':>12} {'kept':>8}"
    )
    for name, (elapsed, cpu, peak, info) in results.items():
        print(
            f"{name:<10} {elapsed:>8.1f} {cpu:>8.1f} {n_docs / elapsed:>9.0f} {n_bytes / 1e6 / elapsed:>7.2f} "
            f"{n_bytes / 1e6 / cpu:>9.2f} {peak / 2**20:>12.0f} {info['kept']:>8}"
        )
    if "datatrove" in results:
        tm, dt = results["tokenmill"], results["datatrove"]
        print(
            f"\ntokenmill / datatrove: {dt[0] / tm[0]:.2f}x wall-clock throughput, {dt[1] / tm[1]:.2f}x per CPU-second "
            f"({args.workers} workers, {args.files} files, load average {os.getloadavg()[0]:.1f})"
        )
    print("tokenmill drops:", results["tokenmill"][3]["dropped"])
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
