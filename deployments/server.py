"""Start a local Prefect server (API + UI) configured so that the UI reaches its API on any port."""

from __future__ import annotations

import os
import sys


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


LOCAL_SERVER = "http://127.0.0.1:4200"


def running_server_api(url: str | None = None, timeout_s: float = 0.5) -> str | None:
    """The API URL of a Prefect server answering at ``url`` (default ``TOKENMILL_SERVER``, else the address
    ``tokenmill server`` listens on), or None."""
    import httpx

    url = (url or os.environ.get("TOKENMILL_SERVER") or LOCAL_SERVER).rstrip("/")
    try:
        healthy = httpx.get(f"{url}/api/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return None
    return f"{url}/api" if healthy else None


def use_running_server() -> str | None:
    """Point this process at a running local server unless an API URL is configured already, so a command-line
    run skips starting Prefect's temporary server (15–60 s); ``TOKENMILL_REUSE_SERVER=0`` turns this off."""
    if os.environ.get("TOKENMILL_REUSE_SERVER", "1") == "0":
        return None
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    api = running_server_api()
    if api:
        os.environ["PREFECT_API_URL"] = api
    return api
