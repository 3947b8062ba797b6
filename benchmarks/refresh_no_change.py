"""How long does a nightly refresh take when no source changed, next to the full pipeline run before it?

Runs on the tests' tiny synthetic corpus in a temporary data root, in this process, against ``PREFECT_API_URL``
if set (else Prefect's ephemeral server, started by a warm-up flow first so no row pays for it): one full
``pipeline`` run, two no-change ``nightly_refresh`` runs, then a refresh after one source file was edited.
Prints wall times and what reran.

    python benchmarks/refresh_no_change.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conftest import tiny_config, write_corpus  # noqa: E402 - the tests' tiny corpus

import flows  # noqa: E402,F401 - Prefect defaults
from storage.artifacts import ArtifactStore  # noqa: E402
from storage.lineage import LineageStore  # noqa: E402


def main() -> None:
    from prefect import flow

    from flows.pipeline import pipeline
    from flows.refresh import nightly_refresh

    flow(name="warm-up")(lambda: None)()  # starts the ephemeral API server when there is no PREFECT_API_URL

    work = Path(tempfile.mkdtemp(prefix="tokenmill-refresh-bench-"))
    write_corpus(work / "corpus")
    cfg = tiny_config(work / "corpus", work / "root")
    lineage = LineageStore(ArtifactStore(cfg.root).lineage_path)
    rows = []

    def timed(label: str, fn) -> None:
        started = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - started
        statuses = [r["status"] for r in lineage.stage_runs(result["run_id"])]
        rebuilt = [r["stage"] for r in lineage.stage_runs(result["run_id"]) if r["status"] == "completed"]
        diff = result.get("diff") or []
        changed = {d["source"]: (d["added"], d["removed"], d["changed"]) for d in diff}
        rows.append((label, elapsed, f"{statuses.count('cached')}/{len(statuses)}", rebuilt, changed))

    timed("full pipeline run", lambda: pipeline(config=cfg))
    timed("refresh, no source change", lambda: nightly_refresh(config=cfg))
    timed("refresh, no source change (again)", lambda: nightly_refresh(config=cfg))
    (work / "corpus" / "docs" / "prose_00.txt").write_text("One edited document about tokenizers and shards.\n" * 5)
    timed("refresh, one file edited", lambda: nightly_refresh(config=cfg))

    print(f"\n{'run':<36} {'wall s':>7}  {'cached':>6}  rebuilt / diff (added, removed, changed)")
    for label, elapsed, cached, rebuilt, changed in rows:
        print(f"{label:<36} {elapsed:7.1f}  {cached:>6}  {rebuilt or '-'} {changed or ''}")


if __name__ == "__main__":
    main()
