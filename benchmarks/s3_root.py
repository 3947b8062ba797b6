"""What an object-store root costs: the data stages with a local root and with an ``s3://`` root, side by side.

Starts ``moto_server`` on 127.0.0.1 (its own process group, stopped by pid), generates a JSONL corpus
(``benchmarks.part_costs``' generator; sources stay local so only the root differs), and runs ingest → clean →
dedup → tokenizer → tokenize through ``run_stage`` twice in this process: once with a local root, once with
``s3://bench/root``. Reports per stage the wall seconds of both and the bytes that crossed to and from the store:
uploaded by the flow process at publish (``RemoteRoot.upload``), uploaded by the stage's parts themselves
(every ``put`` of the S3 file system that is not the flow's publish: docs, token shards, band files, ledger
fragments, ingest's fragment cache), copied server-side (tokenize's shard renames) and downloaded by the flow
process (``RemoteRoot.download``: the inputs it materializes). ``workers: 1`` runs every part in this process,
which is what lets one process count the parts' uploads; on a cluster they are the workers' traffic. Then a
fully cached rerun on the S3 root, and a "fresh machine" (empty mirror) downloading every artifact into
verified local copies. moto is an in-process Python server, so the MB/s are a floor for real S3, not a forecast.
Last, lineage questions on a third machine: looking documents up in the clean ledger after downloading its
ledger files (what lineage does) against reading the ledger parts in place with ranged GETs (DuckDB over fsspec).

    PYTHONPATH=. python -m benchmarks.s3_root --mb 10 --json /tmp/s3_root.json
"""

from __future__ import annotations

import importlib
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

PART_FUNCTIONS = {
    "tasks.data.ingest": ("ingest_part", "write_docs_shard"),
    "tasks.data.clean": ("clean_part",),
    "tasks.data.dedup.sign": ("sign_part",),
    "tasks.data.dedup.candidates": ("band_pairs",),
    "tasks.data.dedup.clusters": ("verify_part",),
    "tasks.data.dedup.stage": ("write_kept_shard",),
    "tasks.data.tokenize": ("own_split_part", "tokenize_part"),
}


class Traffic:
    """Bytes that crossed to and from the store while active, per stage and kind: ``flow_upload``
    (``RemoteRoot.upload``, the publish), ``part_upload`` (files put while a part function runs: what the parts
    upload themselves), ``flow_direct_upload`` (other puts of the flow process: tokenize's saved n-gram indexes),
    ``server_copy`` (object copies inside the store) and ``flow_download`` (``RemoteRoot.download``: the inputs
    the flow process materializes); and the seconds of the flow's publish uploads. Patched while active (s3fs's
    per-file coroutines, since its sync methods are bound per instance; the part functions of ``PART_FUNCTIONS``
    in their modules); the parts must run in this process (``workers: 1``) to be counted.
    """

    def __init__(self) -> None:
        import s3fs

        self.stage = "?"
        self.bytes: dict[str, dict[str, int]] = {}
        self.publish_s: dict[str, float] = {}
        self._originals = [
            (RemoteRoot, "upload", RemoteRoot.upload),
            (RemoteRoot, "download", RemoteRoot.download),
            (s3fs.S3FileSystem, "_put_file", s3fs.S3FileSystem._put_file),
            (s3fs.S3FileSystem, "_cp_file", s3fs.S3FileSystem._cp_file),
        ]
        for module, names in PART_FUNCTIONS.items():
            owner = importlib.import_module(module)
            self._originals += [(owner, name, getattr(owner, name)) for name in names]
        self._publishing = self._in_part = False

    def add(self, kind: str, n_bytes: int) -> None:
        sizes = self.bytes.setdefault(self.stage, {})
        sizes[kind] = sizes.get(kind, 0) + n_bytes

    def __enter__(self) -> Traffic:
        import s3fs

        (_, _, upload), (_, _, download), (_, _, put_file), (_, _, cp_file), *parts = self._originals

        def flow_upload(remote, folder: Path, stage, fp, attempt, files) -> None:
            files, self._publishing = list(files), True
            started = time.perf_counter()
            try:
                upload(remote, folder, stage, fp, attempt, files)
            finally:
                self._publishing = False
            self.publish_s[self.stage] = self.publish_s.get(self.stage, 0.0) + time.perf_counter() - started
            self.add("flow_upload", sum((folder / f).stat().st_size for f in files))

        def flow_download(remote, stage, fp, attempt, files, dest: Path) -> None:
            files = list(files)
            download(remote, stage, fp, attempt, files, dest)
            self.add("flow_download", sum((dest / f).stat().st_size for f in files))

        async def any_put_file(fs, lpath, rpath, *args, **kwargs):
            if not self._publishing:
                self.add("part_upload" if self._in_part else "flow_direct_upload", os.path.getsize(lpath))
            return await put_file(fs, lpath, rpath, *args, **kwargs)

        def in_part(fn):
            def run(part):
                self._in_part = True
                try:
                    return fn(part)
                finally:
                    self._in_part = False

            return run

        for owner, name, fn in parts:
            setattr(owner, name, in_part(fn))

        async def server_copy(fs, path1, path2, *args, **kwargs):
            self.add("server_copy", (await fs._info(path1))["size"])
            return await cp_file(fs, path1, path2, *args, **kwargs)

        RemoteRoot.upload, RemoteRoot.download = flow_upload, flow_download
        s3fs.S3FileSystem._put_file, s3fs.S3FileSystem._cp_file = any_put_file, server_copy
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in self._originals:
            setattr(owner, name, original)

    def total(self, kind: str) -> int:
        return sum(by_kind.get(kind, 0) for by_kind in self.bytes.values())


def run_data_stages(
    cfg: PipelineConfig, traffic: Traffic | None = None
) -> tuple[dict[str, Manifest], dict[str, float], int]:
    """Run the data stages; return manifests, wall seconds per stage, and how many were reused."""
    manifests: dict[str, Manifest] = {}
    walls: dict[str, float] = {}
    reused_n = 0
    for name in DATA_STAGES:
        if traffic is not None:
            traffic.stage = name
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
    with Traffic() as traffic:
        remote, remote_walls, _ = run_data_stages(cfg, traffic)
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
    published_bytes = sum(f.bytes for m in remote.values() for f in m.files)
    return {
        "corpus_docs": n_docs,
        "corpus_mb": round(n_bytes / 1e6, 2),
        "stages": {
            name: {
                "local_root_s": local_walls[name],
                "s3_root_s": remote_walls[name],
                "published_mb": round(sum(f.bytes for f in remote[name].files) / 1e6, 2),
                **{
                    f"{kind}_mb": round(traffic.bytes.get(name, {}).get(kind, 0) / 1e6, 2)
                    for kind in ("flow_upload", "part_upload", "flow_direct_upload", "server_copy", "flow_download")
                },
                "publish_upload_s": round(traffic.publish_s.get(name, 0.0), 2),
                "files": len(remote[name].files),
            }
            for name in DATA_STAGES
        },
        "total_local_root_s": round(sum(local_walls.values()), 2),
        "total_s3_root_s": round(sum(remote_walls.values()), 2),
        "published_mb": round(published_bytes / 1e6, 2),
        "flow_upload_mb": round(traffic.total("flow_upload") / 1e6, 2),
        "part_upload_mb": round(traffic.total("part_upload") / 1e6, 2),
        "flow_direct_upload_mb": round(traffic.total("flow_direct_upload") / 1e6, 2),
        "server_copy_mb": round(traffic.total("server_copy") / 1e6, 2),
        "flow_download_mb": round(traffic.total("flow_download") / 1e6, 2),
        "publish_upload_mb_per_s": round(
            traffic.total("flow_upload") / 1e6 / max(sum(traffic.publish_s.values()), 1e-9), 1
        ),
        "cached_rerun_s": round(cached_s, 2),
        "cached_rerun_reused": f"{reused}/{len(DATA_STAGES)}",
        "fresh_mirror_download_s": round(download_s, 2),
        "download_verify_mb_per_s": round(published_bytes / 1e6 / max(download_s, 1e-9), 1),
        "content_hashes_equal": True,
        "dedup_passes_s": {
            "local_root": local["dedup"].counts["timings_s"],
            "s3_root": remote["dedup"].counts["timings_s"],
        },
        "lineage_questions_clean_ledger": questions,
    }


def main() -> None:
    args = corpus_args(__doc__, default_mb=10.0)
    with tempfile.TemporaryDirectory(prefix="tokenmill-s3-root-") as tmp, moto_server() as endpoint:
        emit(measure(args.mb, args.files, Path(tmp), endpoint), args.json)


if __name__ == "__main__":
    main()
