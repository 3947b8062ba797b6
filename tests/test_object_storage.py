"""Sources on s3:// through a real S3-protocol server (moto in server mode) on 127.0.0.1."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from conftest import _prose

from storage.artifacts import ArtifactStore
from storage.lineage import LineageStore
from tasks.config import PipelineConfig
from tasks.stages import run_stage

s3fs = pytest.importorskip("s3fs")
MOTO_SERVER = Path(sys.executable).with_name("moto_server")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 in its own process group, stopped by pid after the module."""
    if not MOTO_SERVER.exists():
        pytest.skip("moto[server] is not installed")
    port = _free_port()
    proc = subprocess.Popen(
        [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {url}") from None
                time.sleep(0.2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


@pytest.fixture
def s3_credentials(monkeypatch) -> None:
    """Region and credentials in the environment (the usual way: storage_options keys are redacted in lineage)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def test_ingest_reads_s3_sources_and_lineage_records_the_uris(s3_endpoint, s3_credentials, tmp_path: Path):
    options = {
        "client_kwargs": {"endpoint_url": s3_endpoint},
        "key": "testing",
        "secret": "testing",
    }  # redacted in lineage
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    fs.mkdir("corpus")
    for i in range(3):
        fs.pipe(f"corpus/text/doc_{i}.txt", _prose(i).encode())
    fs.pipe("corpus/text/skip.bin", b"\x00not listed")
    records = [json.dumps({"text": _prose(10 + i), "id": f"r{i}"}) for i in range(4)] + ["{broken"]
    fs.pipe("corpus/records.jsonl.gz", gzip.compress(("\n".join(records) + "\n").encode()))

    cfg = PipelineConfig.model_validate(
        {
            "name": "s3",
            "root": str(tmp_path / "root"),
            "workers": 1,
            "sources": [
                {"name": "text", "path": "s3://corpus/text", "storage_options": options},
                {"name": "records", "path": "s3://corpus/records.jsonl.gz", "id_field": "id"}
                | {"storage_options": options},
            ],
            "clean": {"min_chars": 32},
        }
    )
    lineage = LineageStore(ArtifactStore(cfg.root).lineage_path)
    lineage.start_run("s3-run", cfg.name, cfg.model_dump(), cfg.seed, None)
    started = datetime.now(UTC)
    manifest, _ = run_stage("ingest", cfg, {}, run_id="s3-run", log=lambda m: None)
    lineage.record_stage("s3-run", "ingest", "completed", started, manifest=manifest)
    assert manifest.counts["docs_in"] == 8 and manifest.counts["kept"] == 7
    assert manifest.counts["dropped"] == {"malformed_json": 1}

    files = pq.read_table(manifest.file("files")).to_pylist()
    assert sorted(f["uri"] for f in files) == [
        "s3://corpus/records.jsonl.gz",
        "s3://corpus/text/doc_0.txt",
        "s3://corpus/text/doc_1.txt",
        "s3://corpus/text/doc_2.txt",
    ]
    ledger = pq.read_table(manifest.file("ledger")).to_pylist()
    assert {r["source"] for r in ledger} == {"text", "records"} and len(ledger) == 8

    with duckdb.connect(str(lineage.path), read_only=True) as con:
        (params,) = con.execute("SELECT params FROM artifacts WHERE stage = 'ingest'").fetchone()
    sources = json.loads(params)["sources"]
    assert [s["path"] for s in sources] == ["s3://corpus/text", "s3://corpus/records.jsonl.gz"]
    assert sources[0]["storage_options"] == {
        "client_kwargs": {"endpoint_url": s3_endpoint},
        "key": "<redacted>",
        "secret": "<redacted>",
    }

    clean, _ = run_stage("clean", cfg, {"ingest": manifest}, log=lambda m: None)  # downstream reads local Parquet
    assert clean.counts["docs_in"] == 7
