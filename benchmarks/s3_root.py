"""What an object-store root costs: the data stages with a local root and with an ``s3://`` root, side by side.

Starts ``moto_server`` on 127.0.0.1 (its own process group, stopped by pid), generates a JSONL corpus
(``benchmarks.part_costs``' generator; sources stay local so only the root differs), and runs ingest → clean →
dedup → tokenizer → tokenize through ``run_stage`` twice in this process: once with a local root, once with
``s3://bench/root``. Reports per stage the wall seconds of both, the seconds spent uploading and the MB uploaded;
then a fully cached rerun on the S3 root, and a "fresh machine" (empty mirror) downloading every artifact into
verified local copies. moto is an in-process Python server, so the MB/s are a floor for real S3, not a forecast.
Last, lineage questions on a third machine: looking documents up in the clean ledger after downloading its
ledger files (what lineage does) against reading the ledger parts in place with ranged GETs (DuckDB over fsspec).

    PYTHONPATH=. python -m benchmarks.s3_root --mb 10 --json /tmp/s3_root.json
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import duckdb

from benchmarks.part_costs import DATA_STAGES, corpus_args, emit, write_unique_corpus
from storage.artifacts import ArtifactStore, Manifest
from storage.local_s3 import moto_server
from storage.remote import RemoteRoot, register_object_fs
from tasks.config import PipelineConfig
from tasks.stages import UPSTREAM, run_stage


class UploadClock:
    """Seconds and bytes that ``RemoteRoot.upload`` spent, per stage (patched on the class while active)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.bytes: dict[str, int] = {}
        self._original = RemoteRoot.upload

    def __enter__(self) -> UploadClock:
        clock, original = self, self._original

        def upload(remote: RemoteRoot, folder: Path, stage: str, fp: str, attempt: str, files) -> None:
            files = list(files)
            started = time.perf_counter()
            original(remote, folder, stage, fp, attempt, files)
            clock.seconds[stage] = clock.seconds.get(stage, 0.0) + time.perf_counter() - started
            clock.bytes[stage] = clock.bytes.get(stage, 0) + sum((folder / f).stat().st_size for f in files)

        RemoteRoot.upload = upload
        return self

    def __exit__(self, *exc: object) -> None:
        RemoteRoot.upload = self._original


def run_data_stages(cfg: PipelineConfig) -> tuple[dict[str, Manifest], dict[str, float], int]:
    """Run the data stages; return manifests, wall seconds per stage, and how many were reused."""
    manifests: dict[str, Manifest] = {}
    walls: dict[str, float] = {}
    reused_n = 0
    for name in DATA_STAGES:
        started = time.perf_counter()
        manifests[name], reused = run_stage(name, cfg, {u: manifests[u] for u in UPSTREAM[name]}, log=lambda m: None)
        walls[name] = round(time.perf_counter() - started, 2)
        reused_n += reused
    return manifests, walls, reused_n


def ledger_questions(cfg: PipelineConfig, manifest: Manifest, home: Path, n: int = 20) -> dict:
    """Seconds to answer a lookup of ``n`` documents in ``manifest``'s ledger, twice each way, on an empty mirror:
    download the ledger files (verified) then query locally, or query the objects in place (ranged reads)."""
    os.environ["TOKENMILL_HOME"] = str(home)
    store = ArtifactStore(cfg.root)
    manifest = store.load(manifest.stage, manifest.fingerprint)
    parts = [f"{manifest.uri}/{manifest.attempt}/{f.path}" for f in manifest.files if f.path.startswith("ledger/")]
    con = duckdb.connect()
    register_object_fs(con, parts)
    ids = [r[0] for r in con.execute("SELECT doc_id FROM read_parquet(?) USING SAMPLE 20 ROWS", [parts]).fetchall()]
    query = "SELECT doc_id, fate, reason FROM read_parquet(?) WHERE doc_id IN (SELECT unnest(?))"

    def timed(files: list[str]) -> float:
        started = time.perf_counter()
        assert len(con.execute(query, [files, ids[:n]]).fetchall()) == len(ids[:n])
        return round(time.perf_counter() - started, 3)

    ranged = [timed(parts), timed(parts)]
    started = time.perf_counter()
    folder = store.materialize_ledger(manifest)
    local = [str(folder / f.path) for f in manifest.files if f.path.startswith("ledger/")]
    download_s = time.perf_counter() - started
    downloaded = [round(download_s + timed(local), 3), timed(local)]
    ledger_mb = sum(f.bytes for f in manifest.files if f.path.startswith(("ledger/", "ledger-index/"))) / 1e6
    return {
        "ledger_mb": round(ledger_mb, 2),
        "ledger_parts": len(parts),
        "ranged_first_s": ranged[0],
        "ranged_repeat_s": ranged[1],
        "download_then_local_first_s": downloaded[0],
        "download_then_local_repeat_s": downloaded[1],
    }


def measure(mb: float, files: int, work: Path, endpoint: str) -> dict:
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        TOKENMILL_HOME=str(work / "home"),
    )
    n_docs, n_bytes = write_unique_corpus(work / "corpus", mb, files)
    settings = {
        "name": "s3-root",
        "workers": 1,
        "sources": [{"name": "gen", "path": str(work / "corpus")}],
        "dedup": {"workers": 1},
        "tokenizer": {"vocab_size": 4096},
    }
    local, local_walls, _ = run_data_stages(PipelineConfig.model_validate(settings | {"root": str(work / "local")}))
    cfg = PipelineConfig.model_validate(settings | {"root": "s3://bench/root"})
    ArtifactStore(cfg.root).remote.fs.mkdir("bench")
    with UploadClock() as uploads:
        remote, remote_walls, _ = run_data_stages(cfg)
    assert all(remote[k].content_hash == local[k].content_hash for k in DATA_STAGES), "hashes differ"
    started = time.perf_counter()
    _, _, reused = run_data_stages(cfg)
    cached_s = time.perf_counter() - started

    os.environ["TOKENMILL_HOME"] = str(work / "home2")  # a second machine: empty mirror, same bucket
    fresh = ArtifactStore(cfg.root)
    started = time.perf_counter()
    for name in DATA_STAGES:
        fresh.materialize(fresh.load(name, remote[name].fingerprint))
    download_s = time.perf_counter() - started
    questions = ledger_questions(cfg, remote["clean"], work / "home3")
    total_bytes = sum(uploads.bytes.values())
    return {
        "corpus_docs": n_docs,
        "corpus_mb": round(n_bytes / 1e6, 2),
        "stages": {
            name: {
                "local_root_s": local_walls[name],
                "s3_root_s": remote_walls[name],
                "upload_s": round(uploads.seconds.get(name, 0.0), 2),
                "uploaded_mb": round(uploads.bytes.get(name, 0) / 1e6, 2),
                "files": len(remote[name].files),
            }
            for name in DATA_STAGES
        },
        "total_local_root_s": round(sum(local_walls.values()), 2),
        "total_s3_root_s": round(sum(remote_walls.values()), 2),
        "upload_mb_per_s": round(total_bytes / 1e6 / max(sum(uploads.seconds.values()), 1e-9), 1),
        "cached_rerun_s": round(cached_s, 2),
        "cached_rerun_reused": f"{reused}/{len(DATA_STAGES)}",
        "fresh_mirror_download_s": round(download_s, 2),
        "download_verify_mb_per_s": round(total_bytes / 1e6 / max(download_s, 1e-9), 1),
        "content_hashes_equal": True,
        "lineage_questions_clean_ledger": questions,
    }


def main() -> None:
    args = corpus_args(__doc__, default_mb=10.0)
    with tempfile.TemporaryDirectory(prefix="tokenmill-s3-root-") as tmp, moto_server() as endpoint:
        emit(measure(args.mb, args.files, Path(tmp), endpoint), args.json)


if __name__ == "__main__":
    main()
