"""How long does a fully cached ``tokenmill run`` take, with Prefect's temporary server and with a running one?

Each row is a fresh ``tokenmill run`` process, as a user types it, on the same data root: a first run that
builds everything, an all-cached rerun that starts its own temporary server (``TOKENMILL_REUSE_SERVER=0``),
then an all-cached rerun while ``tokenmill server`` is running (the CLI finds and uses it). Prints wall times.

    python benchmarks/cached_rerun.py                       # the tests' tiny corpus
    python benchmarks/cached_rerun.py --config my.yaml      # any configuration (its root is replaced)
"""

from __future__ import annotations

import argparse
import os
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


def _timed_run(config: Path, env: dict[str, str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "wb") as out:
        cmd = [sys.executable, "-m", "flows.cli", "run", "--config", str(config)]
        subprocess.run(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tokenmill-cached-rerun-"))
    config = _config(work, args.config)
    base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    base |= {"PREFECT_HOME": str(work / "prefect-home"), "PYTHONPATH": str(REPO), "PREFECT_LOGGING_LEVEL": "WARNING"}
    own_server = base | {"TOKENMILL_REUSE_SERVER": "0"}
    rows = [
        ("first run (builds every stage)", _timed_run(config, own_server, work / "first.log")),
        ("all cached, temporary server", _timed_run(config, own_server, work / "ephemeral.log")),
    ]
    port = free_port()
    server_env = base | {"PREFECT_HOME": str(work / "server-home")}
    server = start_group(
        [sys.executable, "-m", "flows.cli", "server", "--port", str(port)], server_env, work / "server.log"
    )
    try:
        deadline = time.monotonic() + 300
        while running_server_api(f"http://127.0.0.1:{port}") is None:
            assert time.monotonic() < deadline, (work / "server.log").read_text()[-2000:]
            time.sleep(1)
        reuse = base | {"TOKENMILL_SERVER": f"http://127.0.0.1:{port}"}
        rows.append(("all cached, running tokenmill server", _timed_run(config, reuse, work / "reuse.log")))
    finally:
        stop_group(server)
    print(f"\n{'run':<40} {'wall s':>7}   (logs in {work})")
    for label, seconds in rows:
        print(f"{label:<40} {seconds:7.1f}")


if __name__ == "__main__":
    main()
