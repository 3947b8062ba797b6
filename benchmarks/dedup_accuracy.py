"""Precision and recall of the dedup stage on a corpus with planted near-duplicates of known true Jaccard.

    python -m benchmarks.dedup_accuracy --originals 4000
    python -m benchmarks.dedup_accuracy --originals 4000 --compare   # also other LSH settings, side by side
    python -m benchmarks.dedup_accuracy --originals 4000 --star      # defaults vs star edges (bucket_partners 1)

A planted variant is *found* when the stage puts it in the same cluster as its parent (``cluster_id`` in the
ledger: the kept representative). Precision: of the removed documents, the share whose representative is
of the same family (derived from the same original). Recall is reported per true-similarity bucket; the
target is recall ≥ 0.95 for pairs with true Jaccard ≥ 0.8 at precision ≥ 0.99 with default settings.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.dedup_corpus import Doc, make_corpus, write_clean_shards
from storage.artifacts import StageContext
from tasks.config import DedupConfig
from tasks.data.dedup import dedup

BUCKETS = ((0.0, 0.5), (0.5, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.0), (1.0, 1.01))


def run_stage(paths: list[Path], cfg: DedupConfig, work: Path) -> tuple[dict, dict[str, dict]]:
    ctx = StageContext(out_dir=work / "out", work_dir=work / "work", log=lambda m: None)
    ctx.out_dir.mkdir(parents=True)
    ctx.work_dir.mkdir(parents=True)
    counts = dedup(paths, cfg, ctx)
    ledger = pq.read_table(sorted((ctx.out_dir / "ledger").glob("*.parquet"))).to_pylist()
    return counts, {r["doc_id"]: r for r in ledger}


def score(docs: list[Doc], ledger: dict[str, dict]) -> dict:
    """Precision over removed documents; recall of planted variants, overall and by true-similarity bucket."""
    family = {d.doc_id: set(d.family) for d in docs}
    cluster = {doc_id: row["cluster_id"] for doc_id, row in ledger.items()}
    removed = [row for row in ledger.values() if row["fate"] == "duplicate"]
    correct = sum(bool(family[r["doc_id"]] & family[r["duplicate_of"]]) for r in removed)
    found: dict[tuple[float, float], list[int]] = defaultdict(lambda: [0, 0])
    by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for d in docs:
        if d.parent is None:
            continue
        hit = cluster[d.doc_id] == cluster[d.parent]
        bucket = next(b for b in BUCKETS if b[0] <= d.true_jaccard < b[1])
        found[bucket][0] += hit
        found[bucket][1] += 1
        by_kind[d.kind][0] += hit
        by_kind[d.kind][1] += 1
    high = [sum(found[b][i] for b in BUCKETS if b[0] >= 0.8) for i in (0, 1)]
    return {
        "removed": len(removed),
        "precision": correct / len(removed) if removed else 1.0,
        "false_merges": len(removed) - correct,
        "recall_j>=0.8": high[0] / high[1] if high[1] else None,
        "recall_all_variants": sum(v[0] for v in found.values()) / max(1, sum(v[1] for v in found.values())),
        "by_bucket": {f"[{lo:.1f}, {min(hi, 1.0):.1f}{']' if hi > 1 else ')'}": found[(lo, hi)] for lo, hi in BUCKETS},
        "by_kind": dict(sorted(by_kind.items())),
    }


SETTINGS = {
    "tokenmill default (20x5, verified ≥0.7)": {},
    "datatrove-like (14x8, unverified)": {
        "permutations": 112,
        "bands": 14,
        "rows": 8,
        "verify": False,
        "threshold": 1e-9,
    },
    "14x8, verified ≥0.7": {"permutations": 112, "bands": 14, "rows": 8},
    "16x6, verified ≥0.7": {"permutations": 96, "bands": 16, "rows": 6},
    "20x5, unverified (estimate ≥0.7)": {"verify": False},
    "25x4, verified ≥0.5 (recall-oriented)": {"bands": 25, "rows": 4, "threshold": 0.5},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--originals", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--compare", action="store_true", help="also run other LSH settings on the same corpus")
    ap.add_argument("--star", action="store_true", help="defaults vs star edges only (bucket_partners: 1)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    started = time.perf_counter()
    docs = make_corpus(args.originals, seed=args.seed)
    variants = [d for d in docs if d.parent]
    print(f"corpus: {len(docs)} documents, {len(variants)} planted variants ({time.perf_counter() - started:.1f}s)")
    results = {}
    with tempfile.TemporaryDirectory(prefix="dedup-accuracy-") as tmp:
        paths = write_clean_shards(docs, Path(tmp) / "docs")
        settings = SETTINGS if args.compare else dict(list(SETTINGS.items())[:1])
        if args.star:
            settings = settings | {"20x5, star edges only (bucket_partners 1)": {"bucket_partners": 1}}
        for i, (name, overrides) in enumerate(settings.items()):
            cfg = DedupConfig(workers=args.workers, **overrides)
            t0 = time.perf_counter()
            counts, ledger = run_stage(paths, cfg, Path(tmp) / f"run{i}")
            elapsed = time.perf_counter() - t0
            results[name] = score(docs, ledger) | {"seconds": round(elapsed, 2), "dropped": counts["dropped"]}
    first = next(iter(results.values()))
    print("\n| true Jaccard | variants | " + " | ".join(results) + " |")
    print("| --- | ---: |" + " ---: |" * len(results))
    for bucket in first["by_bucket"]:
        n = first["by_bucket"][bucket][1]
        cells = [f"{r['by_bucket'][bucket][0] / n:.3f}" if n else "–" for r in results.values()]
        print(f"| {bucket} | {n} | " + " | ".join(cells) + " |")
    for key in ("recall_j>=0.8", "recall_all_variants", "precision", "false_merges", "removed", "seconds"):
        cells = [f"{r[key]:.4f}" if isinstance(r[key], float) else str(r[key]) for r in results.values()]
        print(f"| **{key}** | | " + " | ".join(cells) + " |")
    print("\nrecall by variant kind (default settings):")
    for kind, (hit, n) in first["by_kind"].items():
        print(f"  {kind:12s} {hit:5d}/{n:<5d} {hit / n:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
