"""Start a local Prefect server (API + UI) configured so that the UI reaches its API on any port."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path


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
def temporary_server(timeout_s: float = 180, while_starting: Callable[[], object] | None = None) -> Iterator[str]:
    """The Prefect API for one command: ``PREFECT_API_URL`` when configured, else a private server on 127.0.0.1;
    ``while_starting`` (e.g. importing the flow's modules) runs while the server starts, on another core.

    Unlike Prefect's own temporary server, it runs in a session of its own, so Ctrl-C (SIGINT to the whole
    terminal process group) reaches the flow but not the server: the interrupted flow can still report its
    state, and the command exits in seconds instead of retrying a dead server for half a minute. On the way
    out Prefect's log and event queues are drained while the server still answers, then the server stops.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()  # environment, profile (`prefect config set`) or a settings context
    if configured:
        if while_starting is not None:
            while_starting()
        yield configured
        return
    with tempfile.TemporaryDirectory(prefix="tokenmill-prefect-") as home_dir:
        home = Path(home_dir)
        seeded = _seed_database(home)
        try:
            proc, url = _start_private_server(home, timeout_s, while_starting)
        except ServerStartError:
            if not seeded:
                raise
            _empty_database_template().unlink(missing_ok=True)  # a copy the server rejects is not trusted again
            for leftover in home.iterdir():  # start again from an empty home
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            proc, url = _start_private_server(home, timeout_s)
        if not seeded:
            _save_template(home)
        os.environ["PREFECT_API_URL"] = url
        try:
            with temporary_settings(updates={PREFECT_API_URL: url}):  # this process (settings are loaded once)
                yield url
        finally:
            drain_prefect_queues()
            os.environ.pop("PREFECT_API_URL", None)
            stop_group(proc)


class ServerStartError(RuntimeError):
    """The private Prefect server exited or did not answer in time."""


def _start_private_server(
    home: Path, timeout_s: float, while_starting: Callable[[], object] | None = None
) -> tuple[subprocess.Popen, str]:
    """A Prefect server without services on a free port of 127.0.0.1, its state and log in ``home``, answering."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    # A database of its own: run without services, the server never expires concurrency leases, so a slot held
    # by a killed command would stay taken in a shared database and block every later run's training.
    env = server_env("127.0.0.1", port, ui=False) | {"PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    log_path = home / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*server_command("127.0.0.1", port), "--no-services"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    deadline = time.monotonic() + timeout_s
    try:
        if while_starting is not None:
            while_starting()
        while not api_healthy(url):
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise ServerStartError(f"the temporary Prefect server exited ({proc.returncode}): {tail}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"the temporary Prefect server did not answer within {timeout_s:.0f} s")
            time.sleep(0.2)
    except BaseException:  # Ctrl-C while waiting, too
        stop_group(proc)
        raise
    return proc, url


def _empty_database_template() -> Path:
    """Where the migrated, empty server database of this Prefect version is kept (migrating a new database
    takes most of a temporary server's start-up: ≈20 s against ≈8 s from a copy)."""
    import prefect
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value()) / "tokenmill" / f"empty-server-{prefect.__version__}.db"


def _seed_database(home: Path) -> bool:
    """Start ``home`` from a copy of the empty database when a sound one is kept; True when it was."""
    template = _empty_database_template()
    if not template.is_file():
        return False
    try:
        with closing(sqlite3.connect(f"file:{template}?mode=ro", uri=True)) as db:
            sound = db.execute("PRAGMA quick_check").fetchone() == ("ok",)
    except sqlite3.DatabaseError:
        sound = False
    if not sound:
        template.unlink(missing_ok=True)
        return False
    shutil.copyfile(template, home / "prefect.db")
    return True


def _save_template(home: Path) -> None:
    """Keep a consistent copy of the just-migrated database (nothing has run yet), published by a rename."""
    template = _empty_database_template()
    if template.exists() or not (home / "prefect.db").is_file():
        return
    template.parent.mkdir(parents=True, exist_ok=True)
    partial = template.with_name(f".{template.name}.{os.getpid()}.partial")
    try:
        with (
            closing(sqlite3.connect(f"file:{home / 'prefect.db'}?mode=ro", uri=True)) as source,
            closing(sqlite3.connect(partial)) as copy,
        ):
            source.backup(copy)
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file; the server turns WAL back on
        os.replace(partial, template)
    except (OSError, sqlite3.Error):
        partial.unlink(missing_ok=True)  # only a start-up speed-up: the next command tries again


def _die_with_parent() -> None:
    """In the server's process (Linux): get SIGTERM when the command that started it dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def drain_prefect_queues(timeout_s: float = 5) -> None:
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


@contextmanager
def running_server() -> Iterator[str | None]:
    """Point this process and its children at a running local server (``tokenmill server``, or
    ``TOKENMILL_SERVER``) unless an API URL is configured already, so a command-line run skips starting a
    temporary server; yields its API URL, or None. ``TOKENMILL_REUSE_SERVER=0`` turns this off."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = None
    if os.environ.get("TOKENMILL_REUSE_SERVER", "1") != "0" and not PREFECT_API_URL.value():
        api = running_server_api()
    if api is None:
        yield None
        return
    os.environ["PREFECT_API_URL"] = api  # child processes (training, parts)
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}):  # this process: settings are loaded once
            yield api
    finally:
        os.environ.pop("PREFECT_API_URL", None)
