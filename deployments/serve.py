"""Every tokenmill deployment, declared once.

- ``pipeline/tokenmill``: the whole pipeline (Run → Custom run in the UI shows the short run form);
- ``nightly-refresh/nightly``: the refresh on a cron schedule (02:00 in a configurable time zone);
- ``stage/<name>`` for each stage of ``storage.stage_graph.STAGES``: rerun one stage of a recorded run;
- ``sweep/tokenmill``: a sweep (the form takes a spec path or an inline space with a base config, trials, objective).

Concurrency: at most ``PIPELINE_CONCURRENCY`` pipeline runs and one nightly refresh at a time (later runs
wait, "AwaitingConcurrencySlot"); training holds a ``cpu-train`` / ``gpu`` global limit (flows.pipeline).
With a notification block named, a failed or crashed run sends an alert (deployments.alerts).

``tokenmill serve`` serves them all from one process (a process "work pool" with no worker to run);
``tokenmill deploy --pool P`` registers the same deployments with a work pool (process, Docker, Kubernetes),
whose workers import the flows from the installed ``tokenmill`` package.

Serve them with ``tokenmill serve --config configs/quickstart.yaml`` (the CLI calls ``serve_all``).
"""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron

from deployments.server import api_healthy
from tasks.config import PipelineConfig
from tasks.stages import STAGES

NIGHTLY_CRON = "0 2 * * *"
PIPELINE_DEPLOYMENT = "pipeline/tokenmill"
NIGHTLY_DEPLOYMENT = "nightly-refresh/nightly"
SWEEP_DEPLOYMENT = "sweep/tokenmill"
SWEEP_SPEC = "configs/sweep-quickstart.yaml"
TAGS = ["tokenmill"]
PIPELINE_CONCURRENCY = int(os.environ.get("TOKENMILL_PIPELINE_CONCURRENCY", "2"))


def default_parameters(config: PipelineConfig, config_file: Path | None = None, root: str | None = None) -> dict:
    """The run form's defaults: the configuration file's path (the short form stays short), the root given on
    the command line, and the seed and training steps it sets (shown filled in, ready to change); without a
    file, the full configuration."""
    if config_file is None:
        return {"config": config.model_dump(mode="json")}
    shown = {"seed": config.seed} | ({"train_steps": config.train.max_steps} if config.train.max_tokens is None else {})
    return {"config": str(config_file.resolve())} | ({"root": root} if root else {}) | shown


def accepted_by(flow: Any, parameters: dict) -> dict:
    """The parameters a flow's signature takes (the refresh has no seed field: its runs keep the config's)."""
    names = inspect.signature(flow.fn).parameters
    return {k: v for k, v in parameters.items() if k in names}


def build_deployments(
    config: PipelineConfig,
    *,
    parameters: dict | None = None,
    cron: str = NIGHTLY_CRON,
    timezone: str | None = None,
    entrypoint_type: EntrypointType = EntrypointType.FILE_PATH,
    pipeline_concurrency: int = PIPELINE_CONCURRENCY,
) -> list[RunnerDeployment]:
    """The deployments, with ``parameters`` (default: ``config`` in full) as the default parameters of the
    pipeline and the refresh, and the nightly cron in ``timezone``."""
    from flows.pipeline import pipeline
    from flows.refresh import nightly_refresh
    from flows.stage import stage
    from flows.sweep import sweep

    timezone = timezone or os.environ.get("TOKENMILL_TIMEZONE", "UTC")
    params = parameters or default_parameters(config)
    common = {"tags": TAGS, "entrypoint_type": entrypoint_type}
    deployments = [
        pipeline.to_deployment(
            name="tokenmill",
            parameters=params,
            description="The whole pipeline, sources to evaluated model.",
            concurrency_limit=pipeline_concurrency,
            **common,
        ),
        nightly_refresh.to_deployment(
            name="nightly",
            parameters=accepted_by(nightly_refresh, params),
            schedules=[Cron(cron, timezone=timezone)],
            description=f"Nightly data refresh at '{cron}' ({timezone}); one at a time.",
            concurrency_limit=1,
            **common,
        ),
    ]
    deployments.append(
        sweep.to_deployment(
            name="tokenmill",
            parameters={"spec_path": SWEEP_SPEC},
            description="Tune on validation over model and data parameters; evaluate the winner on test once.",
            **common,
        )
    )
    for name in STAGES:
        deployments.append(
            stage.to_deployment(
                name=name,
                parameters={"name": name, "root": config.root},
                description=f"Rerun the {name} stage of a recorded run (give its run_id).",
                **common,
            )
        )
    return deployments


def wait_for_api(timeout_s: float) -> None:
    """Wait until the server at PREFECT_API_URL answers its health check (e.g. when started alongside it)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise RuntimeError("PREFECT_API_URL is not set: start a server (`tokenmill server`) and export its API URL")
    deadline = time.monotonic() + timeout_s
    while not api_healthy(url):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no Prefect server answered at {url} within {timeout_s:.0f} s")
        time.sleep(0.5)


def serve_all(
    config: PipelineConfig,
    *,
    parameters: dict | None = None,
    cron: str = NIGHTLY_CRON,
    timezone: str | None = None,
    limit: int = 4,
    wait_s: float = 0,
    alerts: str | None = None,
) -> None:
    """Serve every deployment from this process until interrupted; flow runs start as child processes.

    ``alerts`` names a notification block (``<type>/<name>``) that failed or crashed runs notify."""
    from prefect import serve

    deployments = build_deployments(config, parameters=parameters, cron=cron, timezone=timezone)
    if wait_s:
        wait_for_api(wait_s)
    if alerts:
        from deployments.alerts import register_failure_alert

        register_failure_alert(alerts)
    serve(*deployments, limit=limit)


def deploy_all(
    config: PipelineConfig,
    work_pool: str,
    *,
    parameters: dict | None = None,
    image: str | None = None,
    cron: str = NIGHTLY_CRON,
    timezone: str | None = None,
    alerts: str | None = None,
) -> list[UUID]:
    """Register every deployment with ``work_pool``; its workers import the flows from the installed package.

    ``image`` (for Docker/Kubernetes pools) names an image that has tokenmill installed; it is used as is.
    """
    from prefect import deploy

    deployments = build_deployments(
        config, parameters=parameters, cron=cron, timezone=timezone, entrypoint_type=EntrypointType.MODULE_PATH
    )
    if alerts:
        from deployments.alerts import register_failure_alert

        register_failure_alert(alerts)
    return deploy(
        *deployments, work_pool_name=work_pool, image=image, build=False, push=False, print_next_steps_message=False
    )
