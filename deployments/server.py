"""Start a local Prefect server (API + UI) configured so that the UI reaches its API on any port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager


def server_env(host: str = "127.0.0.1", port: int = 4200, ui: bool = True, base: dict | None = None) -> dict[str, str]:
    """Environment for ``prefect server start``: the server must itself know its API URL when not on port 4200
    (the UI is told that URL), no telemetry, no promotional banners."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "PREFECT_API_URL": f"http://{host}:{port}/api",
            "PREFECT_UI_ENABLED": "true" if ui else "false",
            "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
        }
    )
    return env


def server_command(host: str = "127.0.0.1", port: int = 4200) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]


def api_healthy(url: str) -> bool:
    """Whether the Prefect API at ``url`` (``http://host:port/api``) answers its health check."""
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def temporary_server(timeout_s: float = 180) -> Iterator[str]:
    """The Prefect API for one command: ``PREFECT_API_URL`` when configured, else a private server on 127.0.0.1.

    Unlike Prefect's own temporary server, it runs in a session of its own, so Ctrl-C (SIGINT to the whole
    terminal process group) reaches the flow but not the server: the interrupted flow can still report its
    state, and the command exits in seconds instead of retrying a dead server for half a minute. On the way
    out Prefect's log and event queues are drained while the server still answers, then the server stops.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()  # environment, profile (`prefect config set`) or a settings context
    if configured:
        yield configured
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    # A database of its own: run without services, the server never expires concurrency leases, so a slot held
    # by a killed command would stay taken in a shared database and block every later run's training.
    with tempfile.TemporaryFile(mode="w+") as log, tempfile.TemporaryDirectory(prefix="tokenmill-prefect-") as home:
        env = server_env("127.0.0.1", port, ui=False) | {"PREFECT_HOME": home}
        env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
        proc = subprocess.Popen(
            [*server_command("127.0.0.1", port), "--no-services"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        os.environ["PREFECT_API_URL"] = url
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"the temporary Prefect server exited ({proc.returncode}): {log.read()[-2000:]}")
                if api_healthy(url):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the temporary Prefect server did not answer within {timeout_s:.0f} s")
                time.sleep(0.2)
            with temporary_settings(updates={PREFECT_API_URL: url}):  # this process (settings are loaded once)
                yield url
        finally:
            _drain_prefect_queues()
            os.environ.pop("PREFECT_API_URL", None)
            stop_group(proc)


def _die_with_parent() -> None:
    """In the server's process (Linux): get SIGTERM when the command that started it dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _drain_prefect_queues(timeout_s: float = 5) -> None:
    """Send Prefect's queued logs and events now, while the server is up (at exit it would be gone)."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout_s)


def stop_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """Stop a process started in its own session, and its children: SIGTERM, then SIGKILL after ``grace_s``;
    children that outlive the leader (flow runs) are killed with the group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


LOCAL_SERVER = "http://127.0.0.1:4200"


def running_server_api(url: str | None = None) -> str | None:
    """The API URL of a Prefect server answering at ``url`` (default ``TOKENMILL_SERVER``, else the address
    ``tokenmill server`` listens on), or None."""
    api = f"{(url or os.environ.get('TOKENMILL_SERVER') or LOCAL_SERVER).rstrip('/')}/api"
    return api if api_healthy(api) else None


def use_running_server() -> str | None:
    """Point this process at a running local server unless an API URL is configured already, so a command-line
    run skips starting a temporary server (``temporary_server``); ``TOKENMILL_REUSE_SERVER=0`` turns this off."""
    if os.environ.get("TOKENMILL_REUSE_SERVER", "1") == "0":
        return None
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    api = running_server_api()
    if api:
        os.environ["PREFECT_API_URL"] = api
    return api
