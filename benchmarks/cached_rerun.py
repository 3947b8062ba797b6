"""How long does a fully cached ``tokenmill run`` take, with Prefect's temporary server and with a running one?

Each row is a fresh ``tokenmill run`` process, as a user types it, on the same data root: a first run that
builds everything, an all-cached rerun that starts its own temporary server (``TOKENMILL_REUSE_SERVER=0``),
then an all-cached rerun while ``tokenmill server`` is running (the CLI finds and uses it). Prints wall times.

    python benchmarks/cached_rerun.py                       # the tests' tiny corpus
    python benchmarks/cached_rerun.py --config my.yaml      # any configuration (its root is replaced)
    python benchmarks/cached_rerun.py --against ../other    # the same rows for another checkout, interleaved
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deployments.server import running_server_api  # noqa: E402
from tests.support.corpus import tiny_config, write_corpus  # noqa: E402
from tests.support.live_prefect import free_port, start_group, stop_group  # noqa: E402


def _config(work: Path, config: Path | None) -> Path:
    if config is None:
        write_corpus(work / "corpus")
        data = tiny_config(work / "corpus", work / "root").model_dump(mode="json")
    else:
        data = yaml.safe_load(config.read_text()) | {"root": str(work / "root")}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _timed_run(config: Path, env: dict[str, str], log: Path, checkout: Path = REPO) -> float:
    started = time.perf_counter()
    with open(log, "wb") as out:
        cmd = [sys.executable, "-m", "flows.cli", "run", "--config", str(config)]
        env = env | {"PYTHONPATH": str(checkout)}
        subprocess.run(cmd, env=env, cwd=checkout, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--against", type=Path, default=None, help="another checkout, measured alongside")
    parser.add_argument("--repeat", type=int, default=3, help="all-cached runs per row (the median is shown)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tokenmill-cached-rerun-"))
    checkouts = {"this checkout": REPO} | ({"other checkout": args.against.resolve()} if args.against else {})
    base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    base |= {"PREFECT_HOME": str(work / "prefect-home"), "PREFECT_LOGGING_LEVEL": "WARNING"}
    own_server = base | {"TOKENMILL_REUSE_SERVER": "0"}
    configs = {name: _config(work / f"c{i}", args.config) for i, name in enumerate(checkouts)}
    times: dict[tuple[str, str], list[float]] = {}

    def measure(label: str, env: dict[str, str]) -> None:
        for name, checkout in checkouts.items():  # interleaved, so load changes hit every checkout alike
            log = configs[name].parent / f"{label.split(',')[0].replace(' ', '-')}-{len(times)}.log"
            times.setdefault((label, name), []).append(_timed_run(configs[name], env, log, checkout))

    measure("first run (builds every stage)", own_server)
    for _ in range(args.repeat):
        measure("all cached, temporary server", own_server)
    port = free_port()
    server_env = base | {"PREFECT_HOME": str(work / "server-home"), "PYTHONPATH": str(REPO)}
    server = start_group(
        [sys.executable, "-m", "flows.cli", "server", "--port", str(port)], server_env, work / "server.log"
    )
    try:
        deadline = time.monotonic() + 300
        while running_server_api(f"http://127.0.0.1:{port}") is None:
            assert time.monotonic() < deadline, (work / "server.log").read_text()[-2000:]
            time.sleep(1)
        for _ in range(args.repeat):
            measure("all cached, running tokenmill server", base | {"TOKENMILL_SERVER": f"http://127.0.0.1:{port}"})
    finally:
        stop_group(server)
    print(f"\n{'run':<40} {'checkout':<16} {'median s':>8}  all (s)   (logs in {work})")
    for (label, name), seconds in times.items():
        print(f"{label:<40} {name:<16} {statistics.median(seconds):8.1f}  {' '.join(f'{x:.1f}' for x in seconds)}")


if __name__ == "__main__":
    main()
