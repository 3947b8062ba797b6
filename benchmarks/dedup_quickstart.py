"""Duplicates in the quickstart corpus: ingest → clean → dedup of configs/quickstart.yaml into a temporary root.

    python -m benchmarks.dedup_quickstart [--config configs/quickstart.yaml] [--examples 12]

Prints the stage counts, how many exact and near-duplicates were removed, and example pairs by file path.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import pyarrow.parquet as pq

from tasks.config import PipelineConfig
from tasks.stages import run_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--examples", type=int, default=12)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tokenmill-dedup-quickstart-") as root:
        cfg = PipelineConfig.from_yaml(args.config, root=root)
        manifests = {}
        for stage, upstream in (("ingest", ()), ("clean", ("ingest",)), ("dedup", ("clean",))):
            started = time.perf_counter()
            manifests[stage], _ = run_stage(stage, cfg, {u: manifests[u] for u in upstream}, log=lambda m: None)
            counts = manifests[stage].counts
            print(
                f"{stage}: {time.perf_counter() - started:.1f}s, in {counts['docs_in']}, kept {counts['kept']}, "
                f"dropped {counts['dropped']}"
            )
        near = manifests["dedup"].counts["near_duplicates"]
        print(
            f"candidate pairs {near['candidate_pairs']}, verified {near['verified_pairs']}, "
            f"LSH threshold {near['lsh_threshold']}, phases {manifests['dedup'].counts['timings_s']}"
        )
        locator = {
            r["doc_id"]: r["locator"] for r in pq.read_table(manifests["ingest"].files_under("ledger/")).to_pylist()
        }
        removed = [r for r in pq.read_table(manifests["dedup"].files_under("ledger/")).to_pylist() if r["duplicate_of"]]
        for reason in ("exact_duplicate", "near_duplicate"):
            rows = sorted((r for r in removed if r["reason"] == reason), key=lambda r: locator[r["doc_id"]])
            print(f"\n{reason}: {len(rows)}")
            for r in rows[:: max(1, len(rows) // args.examples)][: args.examples]:
                print(f"  {locator[r['doc_id']]}  ->  {locator[r['duplicate_of']]}  (similarity {r['similarity']:.3f})")


if __name__ == "__main__":
    main()
