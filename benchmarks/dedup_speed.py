"""Throughput of tokenmill's whole dedup stage vs datatrove's 4-stage MinHash pipeline, side by side.

    python -m benchmarks.dedup_speed --originals 2000 --workers 2 \\
        --datatrove-python /work/bench/datatrove-venv/bin/python

Both get the same synthetic corpus with planted near-duplicates (``benchmarks/dedup_corpus.py``) and the same
number of worker processes. tokenmill reads clean Parquet shards and runs exact + near-duplicate dedup end
to end (plan, sign, band join, verification, clustering, writing docs/ledger/index); datatrove reads the same
texts as JSONL and runs signatures → buckets → clusters → filter (writing kept and removed documents), with
its defaults (word 5-grams, 14 buckets × 8 hashes). datatrove runs in a subprocess with its own interpreter:
it is never a tokenmill dependency. Recall and precision are scored the same way for both
(``benchmarks.dedup_accuracy.score``: a variant is found when it shares its parent's cluster).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from benchmarks.dedup_accuracy import run_stage, score
from benchmarks.dedup_corpus import Doc, make_corpus, write_clean_shards
from tasks.config import DedupConfig

DATATROVE_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers.jsonl import JsonlWriter


    def main():  # guarded: datatrove's forkserver re-imports __main__ in its workers
        data, work, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
        cfg = MinhashConfig()
        timings = {}
        started = time.perf_counter()
        stages = [
            ("signatures", [JsonlReader(data), MinhashDedupSignature(output_folder=f"{work}/sigs", config=cfg)],
             workers),
            ("buckets", [MinhashDedupBuckets(input_folder=f"{work}/sigs", output_folder=f"{work}/buckets",
                                             config=cfg)], cfg.num_buckets),
            ("clusters", [MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/remove_ids",
                                              config=cfg, save_cluster_id=True)], 1),
            ("filter", [JsonlReader(data),
                        MinhashDedupFilter(input_folder=f"{work}/remove_ids", load_cluster_ids=True,
                                           exclusion_writer=JsonlWriter(f"{work}/removed")),
                        JsonlWriter(f"{work}/kept")], workers),
        ]
        for name, pipeline, tasks in stages:
            t0 = time.perf_counter()
            LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks),
                                  logging_dir=f"{work}/logs/{name}").run()
            timings[name] = round(time.perf_counter() - t0, 2)
        timings["total"] = round(time.perf_counter() - started, 2)
        print("RESULT " + json.dumps(timings))


    if __name__ == "__main__":
        main()
    """
)


def write_jsonl(docs: list[Doc], folder: Path, files: int) -> None:
    """The corpus as ``files`` JSONL files (one per datatrove task), in the same order."""
    folder.mkdir(parents=True)
    for part in range(files):
        with open(folder / f"part-{part:03d}.jsonl", "w") as fh:
            for doc in docs[part * len(docs) // files : (part + 1) * len(docs) // files]:
                fh.write(json.dumps({"id": doc.doc_id, "text": doc.text}) + "\n")


def read_datatrove_clusters(work: Path) -> dict[str, dict]:
    """datatrove's output as ledger-like rows: cluster ids from its metadata, the kept member as representative."""
    import gzip

    rows: dict[str, dict] = {}
    for fate in ("kept", "removed"):
        for path in sorted((work / fate).glob("*.jsonl*")):
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt") as fh:
                for line in fh:
                    rec = json.loads(line)
                    cluster = rec.get("metadata", {}).get("minhash_cluster_id", -1)
                    rows[rec["id"]] = {"doc_id": rec["id"], "fate": fate, "cluster": cluster}
    rep_of_cluster = {r["cluster"]: r["doc_id"] for r in rows.values() if r["fate"] == "kept" and r["cluster"] != -1}
    ledger = {}
    for doc_id, r in rows.items():
        rep = rep_of_cluster.get(r["cluster"], doc_id) if r["cluster"] != -1 else doc_id
        ledger[doc_id] = {
            "doc_id": doc_id,
            "fate": "kept" if r["fate"] == "kept" else "duplicate",
            "cluster_id": rep,
            "duplicate_of": rep if r["fate"] == "removed" else None,
        }
    return ledger


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--originals", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--datatrove-python", type=Path, help="interpreter of a venv with datatrove[processing]")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    docs = make_corpus(args.originals, seed=args.seed)
    n = len(docs)
    print(f"corpus: {n} documents ({sum(d.parent is not None for d in docs)} planted variants), {args.workers} workers")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="dedup-speed-") as tmp:
        base = Path(tmp)
        paths = write_clean_shards(docs, base / "parquet", rows_per_shard=max(1, n // args.workers + 1))
        t0 = time.perf_counter()
        counts, ledger = run_stage(paths, DedupConfig(workers=args.workers), base / "tokenmill")
        elapsed = time.perf_counter() - t0
        results["tokenmill"] = {"seconds": round(elapsed, 2), "docs_per_s": round(n / elapsed, 1)}
        results["tokenmill"] |= {"stages_s": counts["timings_s"]} | score(docs, ledger)

        if args.datatrove_python:
            write_jsonl(docs, base / "jsonl", args.workers)
            script = base / "run_datatrove.py"
            script.write_text(DATATROVE_SCRIPT)
            t0 = time.perf_counter()
            proc = subprocess.run(
                [str(args.datatrove_python), str(script), str(base / "jsonl"), str(base / "dt"), str(args.workers)],
                capture_output=True,
                text=True,
            )
            elapsed = time.perf_counter() - t0
            if proc.returncode != 0:
                sys.exit(f"datatrove failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            stages = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
            results["datatrove"] = {"seconds": round(elapsed, 2), "docs_per_s": round(n / elapsed, 1)}
            results["datatrove"] |= {"stages_s": stages} | score(docs, read_datatrove_clusters(base / "dt"))

    print("\n| | seconds | docs/s | recall J≥0.8 | recall (all variants) | precision | stages (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, r in results.items():
        print(
            f"| {name} | {r['seconds']} | {r['docs_per_s']} | {r['recall_j>=0.8']:.4f} | "
            f"{r['recall_all_variants']:.4f} | {r['precision']:.4f} | {r['stages_s']} |"
        )
    if "datatrove" in results:
        ratio = results["tokenmill"]["docs_per_s"] / results["datatrove"]["docs_per_s"]
        print(f"\ntokenmill / datatrove throughput: {ratio:.1f}x")
        print("\nrecall by true-Jaccard bucket (found/planted): ")
        for bucket in results["tokenmill"]["by_bucket"]:
            t, d = results["tokenmill"]["by_bucket"][bucket], results["datatrove"]["by_bucket"][bucket]
            print(f"  {bucket:12s} tokenmill {t[0]}/{t[1]}  datatrove {d[0]}/{d[1]}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
