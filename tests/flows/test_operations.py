"""Operating tokenmill like a Prefect shop, against a real ``prefect server start`` and ``tokenmill serve``.

One server and one serve process for the module (the server takes 6–16 s to start); runs are triggered over
REST exactly as the UI's buttons do, and the browser test drives the UI itself in headless Chromium.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from deployments.serve import NIGHTLY_DEPLOYMENT, PIPELINE_DEPLOYMENT
from deployments.server import drain_prefect_queues, server_env
from flows.pipeline import stage_of_task_run
from storage.artifacts import ArtifactStore
from storage.lineage import LineageStore
from tasks.config import PipelineConfig
from tasks.stages import STAGES, downstream
from tests.support.corpus import tiny_config, write_corpus
from tests.support.live_prefect import LiveServer, free_port, python_command, start_group, stop_group, tail

pytestmark = [pytest.mark.integration, pytest.mark.prefect, pytest.mark.slow]

TIMEZONE = "Europe/Berlin"
# Server services these tests never need: fewer writers on the server's SQLite file on a busy 2-core machine.
# (TRIGGERS stays on: it runs the failure-alert automation.)
IDLE_SERVICES = (
    "LATE_RUNS",
    "FOREMAN",
    "PAUSE_EXPIRATIONS",
    "CANCELLATION_CLEANUP",
    "REPOSSESSOR",
    "EVENT_LOGGER",
)
OUTPUT = Path(os.environ.get("TOKENMILL_TEST_OUTPUT", Path(__file__).resolve().parents[2] / "test-output"))


@dataclass
class WebhookReceiver:
    """An HTTP endpoint on 127.0.0.1 that records the JSON bodies posted to it (the alert's destination)."""

    url: str
    received: list[dict] = field(default_factory=list)

    def wait_for(self, needle: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for body in list(self.received):
                if needle in json.dumps(body):
                    return body
            time.sleep(0.5)
        raise AssertionError(f"no notification mentioning {needle!r} within {timeout} s; got {self.received}")


@pytest.fixture(scope="module")
def alert_receiver():
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server hook's name
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            received.append(json.loads(body or b"{}"))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):  # quiet
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield WebhookReceiver(f"http://127.0.0.1:{httpd.server_address[1]}/alerts", received)
    finally:
        httpd.shutdown()
        httpd.server_close()


@dataclass
class Served:
    server: LiveServer
    work: Path
    corpus: Path
    config: PipelineConfig
    fault_file: Path
    log: Path
    config_path: Path

    def config_for(self, root: str, **overrides: dict) -> dict:
        """The tiny config as the UI would send it, with ``overrides`` merged into sections unvalidated."""
        data = tiny_config(self.corpus, self.work / root).model_dump(mode="json")
        for section, values in overrides.items():
            data[section].update(values)
        return data


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> LiveServer:
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = free_port()
    # what `tokenmill server` sets for the server itself; the served process and the CLI get the same API URL
    env = server_env("127.0.0.1", port, ui=True) | {"PREFECT_HOME": str(home), "PREFECT_LOGGING_LEVEL": "WARNING"}
    env |= {f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in IDLE_SERVICES}
    log = home / "server.log"
    proc = start_group(python_command("-m", "flows.cli", "server", "--port", str(port)), env, log)  # tokenmill server
    server = LiveServer(f"http://127.0.0.1:{port}", env, log, proc)
    try:
        yield server  # still starting: `served` starts `tokenmill serve` meanwhile, then waits for both
    finally:
        stop_group(server.proc)


@pytest.fixture(scope="module")
def served(prefect_server: LiveServer, alert_receiver: WebhookReceiver, tmp_path_factory) -> Served:
    """``tokenmill serve`` with the tiny corpus as default parameters, armed for faults through a spec file, and
    failure alerts sent to the local webhook receiver."""
    work = tmp_path_factory.mktemp("served")
    corpus = work / "corpus"
    write_corpus(corpus)
    config = tiny_config(corpus, work / "root")  # the deployments' default parameters
    config_path = work / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    home = work / "serve-home"
    home.mkdir()
    fault_file = work / "fault-spec"
    env = prefect_server.env | {
        "PREFECT_HOME": str(home),
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_LOGGING_LEVEL": "INFO",  # stage log lines reach the UI
        "TOKENMILL_FAULT": f"@{fault_file}",
        "TOKENMILL_FAULT_DIR": str(work / "faults"),
    }
    log = work / "serve.log"
    cmd = python_command(
        "-m",
        "flows.cli",
        "serve",
        "--config",
        str(config_path),
        "--timezone",
        TIMEZONE,
        "--wait-for-api",
        "180",
        "--alerts",
        alert_receiver.url,
    )
    started = time.monotonic()
    proc = start_group(cmd, env, log)
    try:
        print(f"\nprefect server healthy after {prefect_server.wait_healthy(180):.1f} s")
        deadline = time.monotonic() + 120
        while "tokenmill" not in tail(log) or "serve" not in tail(log).lower():
            assert proc.poll() is None, f"tokenmill serve exited:\n{tail(log)}"
            assert time.monotonic() < deadline, f"tokenmill serve did not start:\n{tail(log)}"
            time.sleep(0.5)
        _wait_for_deployments(prefect_server, deadline)
        print(f"tokenmill serve ready after {time.monotonic() - started:.1f} s (both started together)")
        yield Served(prefect_server, work, corpus, config, fault_file, log, config_path)
    finally:
        stop_group(proc)


def _wait_for_deployments(server: LiveServer, deadline: float) -> None:
    wanted = {PIPELINE_DEPLOYMENT, NIGHTLY_DEPLOYMENT} | {f"stage/{s}" for s in STAGES}
    while True:
        rows = server.request("POST", "/deployments/filter", json={}).json()
        flows = {f["id"]: f["name"] for f in server.request("POST", "/flows/filter", json={}).json()}
        if wanted <= {f"{flows.get(d['flow_id'])}/{d['name']}" for d in rows}:
            return
        assert time.monotonic() < deadline, f"deployments missing; have {rows}"
        time.sleep(0.5)


class _LineageReader:
    """Lineage queries that close their DuckDB handle at once: a handle left open in the test process would
    hold the file's lock and block the served flow runs' writes."""

    def __init__(self, root: str | Path):
        self.path = ArtifactStore(root).lineage_path

    def __getattr__(self, name: str):
        def call(*args, **kwargs):
            store = LineageStore(self.path, read_only=True)
            try:
                return getattr(store, name)(*args, **kwargs)
            finally:
                store.close()

        return call


def _lineage(root: str | Path) -> _LineageReader:
    return _LineageReader(root)


def _run_id(served: Served, flow_run_id: str, root: Path) -> str:
    run_id = _lineage(root).run_for_flow_run(flow_run_id)
    assert run_id, f"no lineage run for flow run {flow_run_id}:\n{tail(served.log)}"
    return run_id


@pytest.fixture(scope="module")
def failed_then_retried(served: Served) -> dict:
    """A pipeline run whose dedup stage fails both task attempts, then the UI's Retry on the failed flow run."""
    server, root = served.server, Path(served.config.root)
    served.fault_file.write_text("dedup:start:2")  # 2 = the task's attempt and its automatic retry
    try:
        flow_run_id = server.run(PIPELINE_DEPLOYMENT, {"config": served.config_for("root")})
        failed = server.wait(flow_run_id, serve_log=served.log)
        failed_name = failed["name"]
        failed_lineage = _lineage(root).stage_runs(_run_id(served, flow_run_id, root))
        failed_tasks = server.task_runs(flow_run_id)
        retried_at = time.monotonic()
        server.retry(flow_run_id)
        completed = server.wait(flow_run_id, serve_log=served.log)
        retry_s = time.monotonic() - retried_at
    finally:
        served.fault_file.unlink(missing_ok=True)
    run_id = _run_id(served, flow_run_id, root)
    return {
        "flow_run_id": flow_run_id,
        "run_id": run_id,
        "root": root,
        "failed": failed,
        "failed_name": failed_name,
        "failed_lineage": failed_lineage,
        "failed_tasks": failed_tasks,
        "completed": completed,
        "lineage": _lineage(root).stage_runs(run_id),
        "tasks": server.task_runs(flow_run_id),
        "retry_s": retry_s,
    }


def test_ui_retry_reruns_only_the_failed_stage_and_its_downstream(failed_then_retried: dict, served: Served):
    r = failed_then_retried
    assert r["failed"]["state_type"] == "FAILED", r["failed"]["state"]
    assert [(s["stage"], s["status"]) for s in r["failed_lineage"]] == [
        ("ingest", "completed"),
        ("clean", "completed"),
        ("dedup", "failed"),
    ]
    assert "injected fault" in r["failed_lineage"][-1]["error"]
    assert r["completed"]["state_type"] == "COMPLETED", tail(served.log)
    assert r["completed"]["run_count"] == 2  # the same flow run, retried
    assert r["completed"]["name"] == r["failed_name"]  # and it keeps its name
    retry_rows = r["lineage"][len(r["failed_lineage"]) :]
    assert {s["stage"]: s["status"] for s in retry_rows} == {
        "ingest": "cached",
        "clean": "cached",
        **dict.fromkeys(downstream("dedup"), "completed"),
    }
    # Prefect's view: the finished stages came from cache, only dedup and what follows ran their code again.
    states: dict[str, list[str]] = {}
    for t in r["tasks"]:
        states.setdefault(t["name"], []).append(t["state_name"])
    assert set(states) == set(STAGES)
    assert "Cached" in states["ingest"] and "Cached" in states["clean"], states
    for name in downstream("dedup"):
        assert "Completed" in states[name], states
    assert (served.work / "faults" / "tokenmill-fault-dedup-start").read_text().endswith(" 2")


def test_a_killed_run_retried_from_the_ui_closes_the_attempt_it_left_running(failed_then_retried: dict, served: Served):
    server, root = served.server, Path(served.config.root)
    served.fault_file.write_text("tokenize:start:kill:1")  # SIGKILL the flow run's process as tokenize starts
    try:
        flow_run_id = server.run(PIPELINE_DEPLOYMENT, {"config": served.config_for("root"), "force": ["tokenize"]})
        crashed = server.wait(flow_run_id, serve_log=served.log)
        assert crashed["state_type"] == "CRASHED", crashed["state"]
        left = [t["name"] for t in server.task_runs(flow_run_id) if t["state_type"] in ("RUNNING", "PENDING")]
        assert [stage_of_task_run(n) for n in left] == ["tokenize"], left  # what the killed process left behind
        server.retry(flow_run_id)
        completed = server.wait(flow_run_id, serve_log=served.log)
    finally:
        served.fault_file.unlink(missing_ok=True)
    assert completed["state_type"] == "COMPLETED", tail(served.log)
    tasks = server.task_runs(flow_run_id)
    assert not [t["name"] for t in tasks if t["state_type"] in ("RUNNING", "PENDING")]
    closed = [t for t in tasks if t["state_name"] == "Crashed"]
    assert [t["name"] for t in closed] == left and "ended before it finished" in closed[0]["state"]["message"]
    rows = [(s["stage"], s["status"]) for s in _lineage(root).stage_runs(_run_id(served, flow_run_id, root))]
    assert rows.count(("tokenize", "crashed")) == 1 and rows[-1] == ("export", "cached"), rows


def test_force_from_the_api_recomputes_that_stage_only(failed_then_retried: dict, served: Served):
    config = served.config_for("root")
    flow_run_id = served.server.run(PIPELINE_DEPLOYMENT, {"config": config, "force": ["tokenize"]})
    assert served.server.wait(flow_run_id, serve_log=served.log)["state_type"] == "COMPLETED", tail(served.log)
    statuses = {
        s["stage"]: s["status"]
        for s in _lineage(failed_then_retried["root"]).stage_runs(
            _run_id(served, flow_run_id, failed_then_retried["root"])
        )
    }
    # tokenize is recomputed; its output is bit-identical, so train and evaluate stay cached.
    assert statuses == {**dict.fromkeys(STAGES, "cached"), "tokenize": "completed"}


def test_stage_deployment_and_cli_rerun_one_stage_from_lineage(failed_then_retried: dict, served: Served):
    run_id, root = failed_then_retried["run_id"], failed_then_retried["root"]
    before = len(_lineage(root).stage_runs(run_id))
    flow_run_id = served.server.run(
        "stage/evaluate", {"name": "evaluate", "run_id": run_id, "root": str(root), "force": True}
    )
    assert served.server.wait(flow_run_id, serve_log=served.log)["state_type"] == "COMPLETED", tail(served.log)
    cli = _cli(served, "stage", "tokenizer", "--run", run_id, "--root", str(root), "--force")
    assert cli.exit_code == 0, cli.output
    added = [(s["stage"], s["status"]) for s in _lineage(root).stage_runs(run_id)[before:]]
    assert added == [("evaluate", "completed"), ("tokenizer", "completed")]
    missing = _cli(served, "stage", "train", "--run", "no-such-run", "--root", str(root))
    assert missing.exit_code == 1 and "no-such-run" in missing.output, missing.output


def test_cli_run_uses_the_running_server_instead_of_starting_one(
    failed_then_retried: dict, served: Served, monkeypatch
):
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("TOKENMILL_SERVER", served.server.url)
    root = failed_then_retried["root"]
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # nothing configured: only the running server
        result = CliRunner().invoke(app, ["run", "--config", str(served.config_path), "--root", str(root)])
    drain_prefect_queues()  # this process's event and log workers must not stay bound to the live server
    assert result.exit_code == 0, result.output
    assert f"using the Prefect server at {served.server.url}/api" in result.output
    latest = _lineage(root).run(_lineage(root).latest_run_id())
    assert served.server.flow_run(latest["flow_run_id"])["state_type"] == "COMPLETED"  # recorded by that server
    assert "PREFECT_API_URL" not in os.environ  # the command put the environment back


def _cli(served: Served, *args: str):
    """``tokenmill …`` in this process (no second `import prefect`), talking to the live server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from typer.testing import CliRunner

    from flows.cli import app

    with temporary_settings(updates={PREFECT_API_URL: f"{served.server.url}/api"}):
        result = CliRunner().invoke(app, list(args))
        drain_prefect_queues()  # this process's event and log workers must not stay bound to the live server
    from storage.lineage import _READERS

    for stores in list(_READERS.values()):  # close the CLI's cached lineage readers now (see _LineageReader)
        for store in list(stores):
            store.close()
    return result


def test_invalid_parameters_are_rejected_before_any_stage_runs(served: Served):
    server = served.server
    bad_vocab = served.config_for("invalid-root", tokenizer={"vocab_size": 10})
    response = server.create_run(PIPELINE_DEPLOYMENT, {"config": bad_vocab})
    assert response.status_code == 409 and "vocab_size" in response.text, response.text
    response = server.create_run(PIPELINE_DEPLOYMENT, {"config": served.config_for("invalid-root"), "force": ["x"]})
    assert response.status_code == 409 and "force" in response.text, response.text
    # a cross-field rule (n_embd divisible by n_head) is checked by pydantic when the flow run starts
    bad_heads = served.config_for("invalid-root", model={"n_embd": 30, "n_head": 4})
    flow_run_id = server.run(PIPELINE_DEPLOYMENT, {"config": bad_heads})
    run = server.wait(flow_run_id, serve_log=served.log)
    assert run["state_type"] == "FAILED"
    assert "n_embd" in run["state"]["message"], run["state"]["message"]
    assert server.task_runs(flow_run_id) == []
    assert not (served.work / "invalid-root").exists()


def test_nightly_refresh_is_scheduled_and_a_no_change_refresh_does_nothing(failed_then_retried: dict, served: Served):
    server = served.server
    deployment = server.deployment(NIGHTLY_DEPLOYMENT)
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 2 * * *"]
    assert deployment["schedules"][0]["schedule"]["timezone"] == TIMEZONE
    deadline = time.monotonic() + 60
    while not (scheduled := server.flow_runs_of(NIGHTLY_DEPLOYMENT, "SCHEDULED")):
        assert time.monotonic() < deadline, "the scheduler created no nightly runs"
        time.sleep(1)
    for run in scheduled:
        local = datetime.fromisoformat(run["expected_start_time"]).astimezone(ZoneInfo(TIMEZONE))
        assert (local.hour, local.minute) == (2, 0), run["expected_start_time"]

    root = failed_then_retried["root"]
    flow_run_id = server.run(NIGHTLY_DEPLOYMENT)  # a Quick run: the deployment's default parameters
    run = server.wait(flow_run_id, serve_log=served.log)
    assert run["state_type"] == "COMPLETED", tail(served.log)
    lineage = _lineage(root)
    refresh_run = lineage.runs(1)[0]["run_id"]
    assert {s["status"] for s in lineage.stage_runs(refresh_run)} == {"cached"}
    diffs = lineage.refresh_diffs(refresh_run)
    assert {d["source"] for d in diffs} == {"docs", "records"}
    assert all(d["added"] == d["removed"] == d["changed"] == 0 and d["unchanged"] > 0 for d in diffs), diffs
    print(f"no-change refresh: {run['total_run_time']:.1f} s of flow run time")


def test_a_failed_run_notifies_the_webhook(failed_then_retried: dict, served: Served, alert_receiver: WebhookReceiver):
    """The automation `tokenmill serve --alerts URL` registered fires on the failed run (before its Retry)."""
    body = alert_receiver.wait_for(failed_then_retried["failed_name"])
    assert "failed" in body["subject"].lower() and "injected fault" in body["text"], body
    assert f"/runs/flow-run/{failed_then_retried['flow_run_id']}" in body["text"]  # a link into the UI
    OUTPUT.mkdir(parents=True, exist_ok=True)
    (OUTPUT / "failure-notification.json").write_text(json.dumps(body, indent=2) + "\n")


def test_a_schedule_made_in_the_ui_produces_valid_runs(failed_then_retried: dict, served: Served):
    """What the UI's "+ Schedule" stores: fields left untouched as ``{"__prefect_kind": "json"}`` placeholders,
    which the scheduler copies into its runs unhydrated. The run must validate and use the deployment's defaults."""
    server = served.server
    deployment = server.deployment(PIPELINE_DEPLOYMENT)
    untouched = {"__prefect_kind": "json"}
    parameters = {"config": untouched, "root": untouched, "seed": 77, "train_steps": untouched, "force": untouched}
    created = server.request(
        "POST",
        f"/deployments/{deployment['id']}/schedules",
        json=[{"schedule": {"cron": "30 3 * * *", "timezone": "UTC"}, "active": True, "parameters": parameters}],
    )
    assert created.status_code == 201, created.text
    recorded, run = _run_one_scheduled(served, deployment["id"], created.json()[0]["id"], seed=77)
    assert run["parameters"]["train_steps"] == untouched  # stored unhydrated
    assert recorded["root"] == served.config.root  # the deployment's configuration
    assert recorded["train"]["max_steps"] == served.config.train.max_steps


def _run_one_scheduled(served: Served, deployment_id: str, schedule_id: str, seed: int) -> tuple[dict, dict]:
    """Have the server schedule runs from its schedules, start the one with ``seed`` now, wait for it to complete;
    the configuration lineage recorded for it, and the flow run. Deletes the schedule and scheduled runs."""
    server = served.server
    try:
        now = datetime.now(UTC)
        scheduled = server.request(  # the scheduler service's own code path, without waiting for its loop
            "POST",
            f"/deployments/{deployment_id}/schedule",
            json={"end_time": (now + timedelta(days=2)).isoformat(), "max_runs": 2},
        )
        assert scheduled.status_code in (200, 201), scheduled.text
        runs = [r for r in server.flow_runs_of(PIPELINE_DEPLOYMENT, "SCHEDULED") if r["parameters"].get("seed") == seed]
        assert runs, server.flow_runs_of(PIPELINE_DEPLOYMENT, "SCHEDULED")
        run_now = {"type": "SCHEDULED", "state_details": {"scheduled_time": now.isoformat()}}
        server.request("POST", f"/flow_runs/{runs[0]['id']}/set_state", json={"state": run_now, "force": True})
        run = server.wait(runs[0]["id"], serve_log=served.log)
        assert run["state_type"] == "COMPLETED", (run["state"], tail(served.log))
        root = Path(served.config.root)
        recorded = json.loads(_lineage(root).run(_run_id(served, runs[0]["id"], root))["config"])
        assert recorded["seed"] == seed
        return recorded, runs[0]
    finally:
        server.request("DELETE", f"/deployments/{deployment_id}/schedules/{schedule_id}")
        for leftover in server.flow_runs_of(PIPELINE_DEPLOYMENT, "SCHEDULED"):
            server.request("DELETE", f"/flow_runs/{leftover['id']}")


def test_browser_add_schedule_dialog_makes_a_schedule_whose_runs_validate(failed_then_retried: dict, served: Served):
    """Headless Chromium: the deployment's "+ Schedule" dialog, overrides for the configuration, seed and training
    steps chosen and only the seed changed, Save; the runs the server makes from that schedule complete."""
    server = served.server
    deployment = server.deployment(PIPELINE_DEPLOYMENT)
    shot = OUTPUT / "prefect-ui-add-schedule.png"
    with _browser_page(served, "chromium-profile-schedule") as page:
        try:
            page.goto(f"{server.url}/deployments/deployment/{deployment['id']}")
            page.get_by_role("button", name="Schedule", exact=True).click()
            dialog = page.get_by_role("dialog")
            dialog.get_by_placeholder("Enter a unique identifier for this schedule").fill("ui-hourly")
            overrides = dialog.locator("button.p-select-button__control").last  # "Select parameters to override"
            overrides.scroll_into_view_if_needed()
            overrides.focus()
            page.keyboard.press("ArrowDown")
            for name in ("config", "seed", "train_steps"):
                page.get_by_role("option", name=name, exact=True).click()
            page.keyboard.press("Escape")
            dialog.locator(".p-label", has_text="Seed (Optional)").locator("input").fill("78")
            page.screenshot(path=str(shot), full_page=True)
            with page.expect_response(lambda r: r.url.endswith("/schedules") and r.request.method == "POST") as saved:
                dialog.get_by_role("button", name="Save", exact=True).click()
            assert saved.value.status == 201, saved.value.text()
        finally:
            print(f"screenshot: {shot}")
    schedule = next(
        s
        for s in server.request("GET", f"/deployments/{deployment['id']}/schedules").json()
        if s["slug"] == "ui-hourly"
    )
    assert schedule["parameters"]["seed"] == 78, schedule
    recorded, _ = _run_one_scheduled(served, deployment["id"], schedule["id"], seed=78)
    assert recorded["train"]["max_steps"] == served.config.train.max_steps  # the fields left as they were


def _playwright():
    """Playwright's sync API, or a skip when the system Chromium or playwright is missing."""
    if _chromium() is None:
        pytest.skip("chromium is not installed (make test installs it with apt-get; see README)")
    return pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def _browser_page(served: Served, profile: str):
    """A headless Chromium page on the live server's UI that can reach nothing else."""
    sync_api = _playwright()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    base = served.server.url
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            user_data_dir=str(served.work / profile),  # fresh: passed to Chromium as --user-data-dir
            executable_path=_chromium(),
            headless=True,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
            viewport={"width": 1400, "height": 1000},
        )
        # the UI calls an analytics host even with DO_NOT_TRACK: nothing may leave the machine
        context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base) else route.abort())
        page = context.new_page()
        page.set_default_timeout(60_000)
        try:
            yield page
        finally:
            context.close()


def _submit(page, attempts: int = 3) -> str:
    """Click Submit and return the created flow run's id; a 503 (server's SQLite busy) is submitted again."""
    for _ in range(attempts):
        with page.expect_response(lambda r: "create_flow_run" in r.url and r.request.method == "POST") as created:
            page.get_by_role("button", name="Submit").click()
        if created.value.status == 201:
            return created.value.json()["id"]
        assert created.value.status == 503, f"{created.value.status}: {created.value.text()}"
        time.sleep(2)
    raise AssertionError(f"create_flow_run answered 503 {attempts} times")


def _field(page, label: str):
    """The input of a parameter in the v2 run form (its label is not tied to the input, so find it by position)."""
    group = f"//label[normalize-space()='{label}']/ancestor::div[contains(@class, 'group')][1]"
    return page.locator(f"xpath={group}//input")


FORM_FIELDS = "input:visible, textarea:visible, select:visible, [role=combobox]:visible, [role=switch]:visible"


def test_browser_short_run_form_then_the_loss_curve_on_the_run(failed_then_retried: dict, served: Served):
    """Headless Chromium: Deployments → pipeline → Run → Custom run → the short form (Seed and Training steps
    changed) → Submit → Completed; then the run's evaluation report shows the loss-curve picture.

    It runs after the retry scenario on the same data root, so only train, evaluate and export recompute."""
    sync_api = _playwright()
    shots = {name: OUTPUT / f"prefect-ui-{name}.png" for name in ("run-form", "custom-run", "loss-curve")}
    base = served.server.url
    with _browser_page(served, "chromium-profile") as page:
        try:
            page.goto(f"{base}/")
            page.get_by_role("link", name="Deployments").first.click()
            page.get_by_role("link", name="tokenmill", exact=True).first.click()
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Custom run").click()
            # the served configuration's seed and budget are shown filled in
            seed, steps = _field(page, "Seed (Optional)"), _field(page, "Training steps (Optional)")
            try:
                seed.wait_for(timeout=20_000)
            except sync_api.TimeoutError:
                (OUTPUT / "prefect-ui-run-form.html").write_text(page.content())
                raise
            assert seed.input_value() == str(served.config.seed)
            assert steps.input_value() == str(served.config.train.max_steps)
            seed.fill("4242")
            steps.fill(str(served.config.train.max_steps + 2))
            fields = page.locator(FORM_FIELDS).count()
            height = page.evaluate("document.documentElement.scrollHeight")
            page.screenshot(path=str(shots["run-form"]), full_page=True)
            print(f"\n  run form: {fields} visible fields, page {height} px high")
            assert fields <= 25 and height <= 4000, (fields, height)  # was ~300 fields and ~15,000 px
            flow_run_id = _submit(page)
            page.goto(f"{base}/v2/runs/flow-run/{flow_run_id}")
            run = served.server.wait(flow_run_id, serve_log=served.log)
            assert run["state_type"] == "COMPLETED", tail(served.log)
            assert (run["parameters"]["seed"], run["parameters"]["train_steps"]) == (
                4242,
                served.config.train.max_steps + 2,
            )
            root = Path(served.config.root)
            statuses = {r["stage"]: r["status"] for r in _lineage(root).stage_runs(_run_id(served, flow_run_id, root))}
            assert statuses == {
                **dict.fromkeys(STAGES, "cached"),
                "train": "completed",
                "evaluate": "completed",
                "export": "completed",
            }
            page.reload()  # the Logs tab does not refetch by itself
            page.get_by_text("Completed").first.wait_for()
            page.get_by_text("clean: cached", exact=False).first.wait_for()  # cached stages are named in the logs
            page.screenshot(path=str(shots["custom-run"]), full_page=True)

            page.get_by_role("tab", name="Artifacts").click()
            page.get_by_text("evaluation-report").first.click()
            curve = page.locator('img[alt="training loss curve"]').first
            curve.wait_for(state="visible")
            curve.scroll_into_view_if_needed()
            assert curve.evaluate("img => img.complete && img.naturalWidth > 100"), "the loss curve did not load"
        finally:
            page.screenshot(path=str(shots["loss-curve"]), full_page=True)
    for shot in shots.values():
        assert shot.stat().st_size > 0
        print(f"screenshot: {shot}")
