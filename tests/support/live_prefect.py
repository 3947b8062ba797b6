"""Helpers for tests against a real ``prefect server start`` and a ``tokenmill serve`` process.

Both run in their own process group (flow runs are children of the serve process) and are stopped with
``killpg``. The test process talks to the server over REST only, as the UI does.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from deployments.server import stop_group as stop_process_group

REPO = Path(__file__).resolve().parents[2]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_group(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def stop_group(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the process group, then SIGKILL what is left of it."""
    stop_process_group(proc, timeout)


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:P
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=f"{self.url}/api", timeout=30)

    def wait_healthy(self, timeout: float = 120) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {self.proc.returncode}:\n{tail(self.log)}")
            try:
                if self.client.get("/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"prefect server not healthy after {timeout} s:\n{tail(self.log)}")

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One API call, retried while the server answers 503 (SQLite busy), as Prefect's own client does."""
        for _ in range(20):
            response = self.client.request(method, url, **kwargs)
            if response.status_code != 503:
                return response
            time.sleep(1)
        return response

    # --- the REST calls the UI makes ---------------------------------------------------------------------

    def deployment(self, full_name: str) -> dict:
        flow, name = full_name.split("/")
        response = self.request("GET", f"/deployments/name/{flow}/{name}")
        response.raise_for_status()
        return response.json()

    def create_run(self, deployment: str, parameters: dict[str, Any] | None = None) -> httpx.Response:
        """What the UI's Run / Custom run button sends: a scheduled flow run of the deployment."""
        body = {"state": {"type": "SCHEDULED", "message": "Run from the Prefect UI"}}
        if parameters is not None:
            body["parameters"] = parameters
        return self.request("POST", f"/deployments/{self.deployment(deployment)['id']}/create_flow_run", json=body)

    def run(self, deployment: str, parameters: dict[str, Any] | None = None) -> str:
        response = self.create_run(deployment, parameters)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def retry(self, flow_run_id: str) -> None:
        """The UI's Retry button on a failed flow run."""
        response = self.request(
            "POST",
            f"/flow_runs/{flow_run_id}/set_state",
            json={"state": {"type": "SCHEDULED", "name": "AwaitingRetry"}},
        )
        response.raise_for_status()
        assert response.json()["status"] == "ACCEPT", response.text

    def flow_run(self, flow_run_id: str) -> dict:
        response = self.request("GET", f"/flow_runs/{flow_run_id}")
        response.raise_for_status()
        return response.json()

    def wait(self, flow_run_id: str, timeout: float = 180, serve_log: Path | None = None) -> dict:
        """Wait for a terminal state; print how long the run took from its (re)scheduling and inside its flow."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            run = self.flow_run(flow_run_id)
            if run["state_type"] in TERMINAL:
                print(
                    f"\n  flow run {run['name']}: {run['state_name']} after {time.monotonic() - started:.1f} s "
                    f"({run['total_run_time']:.1f} s running)"
                )
                return run
            time.sleep(0.5)
        raise TimeoutError(f"flow run {flow_run_id} still {run['state_name']}:\n{tail(serve_log) if serve_log else ''}")

    def task_runs(self, flow_run_id: str) -> list[dict]:
        response = self.request(
            "POST",
            "/task_runs/filter",
            json={"flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"},
        )
        response.raise_for_status()
        return response.json()

    def flow_runs_of(self, deployment: str, state: str | None = None) -> list[dict]:
        body: dict[str, Any] = {"deployments": {"id": {"any_": [self.deployment(deployment)["id"]]}}}
        if state:
            body["flow_runs"] = {"state": {"type": {"any_": [state]}}}
        response = self.request("POST", "/flow_runs/filter", json=body)
        response.raise_for_status()
        return response.json()


def python_command(*args: str) -> list[str]:
    return [sys.executable, *args]
