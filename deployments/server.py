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
