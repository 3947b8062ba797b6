"""What does stage reuse save in a sweep? A sweep's wall time next to the same trials run one by one, each alone.

Runs, in this process and against ``PREFECT_API_URL`` if set (else Prefect's ephemeral server, started by a
warm-up flow first so no row pays for it):

1. the sweep of ``--spec`` (test not read) in a fresh data root;
2. each of its trials alone: a one-trial sweep with that trial's parameters, each in a fresh data root of its
   own, so nothing is shared (every data stage, the training and the scoring run again);

and prints the wall times, each trial's objective in both (they must match: same fingerprints), and what was
built. ``--set PATH=VALUE`` fixes a setting in every trial; ``--max-steps N`` sets ``train.max_steps`` (and
``eval_interval`` to N / 4): a shorter run of the same search.

    python benchmarks/sweep_reuse.py --spec configs/sweep-quickstart.yaml --max-steps 40 --set model.n_layer=2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flows  # noqa: E402,F401 - Prefect defaults
from storage.artifacts import ArtifactStore  # noqa: E402
from storage.lineage import LineageStore  # noqa: E402
from storage.stage_graph import STAGES  # noqa: E402
from tasks.sweep.spec import load_spec  # noqa: E402


def _write_spec(folder: Path, spec: dict, base: Path, root: Path, space: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{spec['name']}.yaml"
    fields = {k: v for k, v in spec.items() if k not in ("sampler", "trials", "pruning")}
    path.write_text(yaml.safe_dump(fields | {"base": str(base), "root": str(root), "space": space}, sort_keys=False))
    return path


def _artifacts(root: Path) -> dict[str, int]:
    store = ArtifactStore(root)
    return {stage: n for stage in STAGES if (n := len(store.published(stage)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=Path("configs/sweep-quickstart.yaml"))
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="Fix a setting, every trial")
    args = parser.parse_args()

    from prefect import flow

    from flows.sweep import sweep

    flow(name="warm-up")(lambda: None)()  # starts the ephemeral API server when there is no PREFECT_API_URL
    spec, _ = load_spec(args.spec)
    if spec.sampler != "grid":
        raise SystemExit("the benchmark replays a grid: every trial's parameters are known in advance")
    base = (args.spec.parent / spec.base).resolve()
    fixed = {}
    if args.max_steps:  # a shorter run of the same search, still validated four times for the curves
        fixed = {"train.max_steps": [args.max_steps], "train.eval_interval": [max(args.max_steps // 4, 1)]}
    for item in args.set:  # e.g. model.n_layer=2: a smaller model for a loaded machine
        path, value = item.split("=", 1)
        fixed[path] = [yaml.safe_load(value)]
    raw = spec.model_dump(mode="json", exclude_none=True)
    work = Path(tempfile.mkdtemp(prefix="tokenmill-sweep-bench-"))

    space = {path: list(values) for path, values in spec.space.items()} | fixed
    sweep_spec = _write_spec(work / "specs", raw, base, work / "sweep-root", space)
    started = time.perf_counter()
    result = sweep(spec_path=str(sweep_spec), test=False)
    sweep_s = time.perf_counter() - started
    trials = LineageStore(ArtifactStore(work / "sweep-root").lineage_path).trials(result["sweep_id"])

    alone = []
    for t in trials:
        root = work / f"alone-{t['trial']}"
        one = {path: [value] for path, value in t["params"].items()}
        path = _write_spec(
            work / "specs" / f"alone-{t['trial']}", raw | {"name": f"alone-{t['trial']}"}, base, root, one
        )
        started = time.perf_counter()
        single = sweep(spec_path=str(path), test=False)
        elapsed = time.perf_counter() - started
        (row,) = LineageStore(ArtifactStore(root).lineage_path).trials(single["sweep_id"])
        alone.append((t, row, elapsed, _artifacts(root)))

    built = _artifacts(work / "sweep-root")
    print(f"\nsweep of {len(trials)} trials (concurrency {spec.concurrency}): {sweep_s:.1f} s, built {built}")
    print(f"{'trial':>5} {'params':<44} {'objective (sweep)':>18} {'objective (alone)':>18} {'alone s':>8}")
    for t, row, elapsed, _ in alone:
        print(
            f"{t['trial']:>5} {str(t['params']):<44} {t['objective'] or float('nan'):18.4f} "
            f"{row['objective'] or float('nan'):18.4f} {elapsed:8.1f}"
        )
    total = sum(elapsed for _, _, elapsed, _ in alone)
    print(f"sum of the trials run alone: {total:.1f} s; the sweep took {sweep_s:.1f} s ({total / sweep_s:.2f}x)")
    print(f"sweep spec and root: {sweep_spec} {work / 'sweep-root'}")


if __name__ == "__main__":
    main()
