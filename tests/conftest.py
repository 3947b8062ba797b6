"""Shared fixtures (an isolated Prefect first of all); the data builders live in ``tests/support``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Isolate Prefect before anything imports it: own home, no telemetry, a patient ephemeral server.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="tokenmill-prefect-home-"))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from tasks.config import PipelineConfig  # noqa: E402
from tests.support.corpus import tiny_config, write_corpus  # noqa: E402


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    write_corpus(folder)
    return folder


@pytest.fixture
def config(corpus: Path, tmp_path: Path) -> PipelineConfig:
    return tiny_config(corpus, tmp_path / "root")


@pytest.fixture(scope="session")
def prefect_harness():
    """One ephemeral Prefect API server for the session's flow tests (≈20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    from deployments.server import drain_prefect_queues

    with prefect_test_harness(server_startup_timeout=120):
        yield
        drain_prefect_queues()  # logs and events sent while the server is still up, not retried at exit


@pytest.fixture(scope="module")
def dask_cluster():
    """A local Dask cluster of 2 worker processes on 127.0.0.1 (≈3 s to start), closed after the module."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        yield cluster
