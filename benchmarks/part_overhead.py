"""What one part costs the engine, apart from its work: local process pool vs Dask vs Prefect task runs on Dask.

Maps ``--parts`` parts that do nothing (``time.sleep(0)``) through each executor inside one Prefect flow run,
on one private 2-worker ``LocalCluster`` (127.0.0.1) for both Dask executors, after one warm-up part each (the
first part on a worker pays its imports). Reports wall milliseconds per part and the ratio to plain Dask: the
overhead a part must dwarf, which is why parts are sized to seconds of work (docs/scaling.md §2).

    PYTHONPATH=. python -m benchmarks.part_overhead --parts 64
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="part-overhead-prefect-"))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from distributed import Client, LocalCluster  # noqa: E402
from prefect import flow  # noqa: E402

from flows.runners import parts_executor  # noqa: E402
from tasks.config import PipelineConfig  # noqa: E402
from tasks.parts import (  # noqa: E402
    DaskExecutor,
    local_cluster_kwargs,
    map_parts,  # noqa: E402
    use_executor,
)


def _per_part_ms(n: int) -> float:
    map_parts(time.sleep, [0.0, 0.0], workers=2)  # warm-up: a part on each worker
    started = time.perf_counter()
    map_parts(time.sleep, [0.0] * n, workers=2)
    return 1000 * (time.perf_counter() - started) / n


@flow(name="part-overhead")
def measure(address: str, n: int) -> dict[str, float]:
    """Per-part wall milliseconds on each executor, all inside this flow run."""
    ms = {"local process pool (2)": _per_part_ms(n)}
    with Client(address) as client, use_executor(DaskExecutor(client)):
        ms["dask (Client.map)"] = _per_part_ms(n)
    cfg = PipelineConfig(executor="prefect-dask", executor_address=address)
    with parts_executor(cfg) as executor:
        ms["prefect-dask (a task run per part)"] = _per_part_ms(n)
        started = time.perf_counter()
        futures = [executor._submit(time.sleep, 0.0, i) for i in range(n)]
        ms["  of which submitting, in the flow process"] = 1000 * (time.perf_counter() - started) / n
        for future in futures:
            future.result()
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=64)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    with LocalCluster(**local_cluster_kwargs(2)) as cluster:
        ms = measure(cluster.scheduler_address, args.parts)
    dask = ms["dask (Client.map)"]
    print(f"{args.parts} empty parts, 2 workers, load average {os.getloadavg()[0]:.1f}")
    print(f"{'executor':40} {'ms/part':>8} {'x dask':>7}")
    for name, value in ms.items():
        print(f"{name:40} {value:8.1f} {value / dask:7.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"parts": args.parts, "ms_per_part": ms}, fh, indent=2)


if __name__ == "__main__":
    main()
