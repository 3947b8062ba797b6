"""Sources and artifact roots on s3:// through a real S3-protocol server (moto in server mode) on 127.0.0.1."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app
from storage.artifacts import MANIFEST, ArtifactStore, CorruptArtifactError, Manifest, StageContext, StageKey
from storage.faults import InjectedFault
from storage.lineage import LineageStore
from storage.lineage_queries import LineageQueries
from storage.local_s3 import MOTO_SERVER, moto_server
from tasks.config import PipelineConfig
from tasks.data.dedup import resolve_previous
from tasks.run_recorder import RunRecorder
from tasks.stages import UPSTREAM, run_stage
from tests.support.corpus import prose, tiny_config, write_corpus

s3fs = pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 in its own process group, stopped by pid after the module."""
    if not MOTO_SERVER.exists():
        pytest.skip("moto[server] is not installed")
    with moto_server() as url:
        yield url


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
        fs.pipe(f"corpus/text/doc_{i}.txt", prose(i).encode())
    fs.pipe("corpus/text/skip.bin", b"\x00not listed")
    records = [json.dumps({"text": prose(10 + i), "id": f"r{i}"}) for i in range(4)] + ["{broken"]
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


DATA_STAGES = ("ingest", "clean", "dedup", "tokenizer", "tokenize")


@pytest.fixture
def s3_root_env(s3_endpoint: str, s3_credentials, monkeypatch, tmp_path: Path) -> str:
    """An artifact root's endpoint and credentials the usual way, from the environment; a private local mirror."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path / "home"))
    s3fs.S3FileSystem.clear_instance_cache()  # instances remember the endpoint they were made with
    yield s3_endpoint
    s3fs.S3FileSystem.clear_instance_cache()


def _run_data_stages(cfg: PipelineConfig, run_id: str) -> dict[str, tuple[Manifest, bool]]:
    """ingest → tokenize as ``run_all`` runs them, recorded in the root's lineage file."""
    lineage = LineageStore(ArtifactStore(cfg.root).lineage_path)
    lineage.start_run(run_id, cfg.name, cfg.model_dump(), cfg.seed, None)
    out: dict[str, tuple[Manifest, bool]] = {}
    for name in DATA_STAGES:
        started = datetime.now(UTC)
        inputs = {u: out[u][0] for u in UPSTREAM[name]}
        out[name] = run_stage(name, cfg, inputs, run_id=run_id, log=lambda m: None)
        lineage.record_stage(run_id, name, "cached" if out[name][1] else "completed", started, manifest=out[name][0])
    lineage.finish_run(run_id, "completed")
    return out


def _objects(fs, prefix: str) -> dict[str, str]:
    return {name: info["ETag"] for name, info in fs.find(prefix, detail=True).items()}


def test_data_stages_publish_to_an_s3_root_and_reuse_it(s3_root_env, tmp_path: Path, monkeypatch):
    fs = s3fs.S3FileSystem(skip_instance_cache=True)  # endpoint and credentials from the environment
    fs.mkdir("tokenmill")
    write_corpus(tmp_path / "corpus")
    fs.put(str(tmp_path / "corpus") + "/", "tokenmill/corpus/", recursive=True)
    options = {"endpoint_url": s3_root_env, "key": "testing", "secret": "testing"}  # worker processes need them
    sources = [
        {"name": "docs", "path": "s3://tokenmill/corpus/docs", "storage_options": options},
        {"name": "records", "path": "s3://tokenmill/corpus/records.jsonl.gz", "storage_options": options},
    ]
    local = _run_data_stages(tiny_config(tmp_path / "corpus", tmp_path / "local", sources=sources), "local")
    cfg = tiny_config(tmp_path / "corpus", "s3://tokenmill/runs", sources=sources)
    remote = _run_data_stages(cfg, "s3-1")

    # Same bytes as with a local root; published under <root>/<stage>/<fingerprint>/ with the manifest as commit.
    assert {k: m.content_hash for k, (m, _) in remote.items()} == {k: m.content_hash for k, (m, _) in local.items()}
    assert not any(reused for _, reused in remote.values())
    for name, (m, _) in remote.items():
        folder = f"tokenmill/runs/{name}/{m.fingerprint}"
        assert m.uri == f"s3://{folder}" and Path(m.path).is_relative_to(tmp_path / "home")  # path: the local copy
        assert sorted(fs.find(f"{folder}/")) == sorted(
            [f"{folder}/{MANIFEST}"] + [f"{folder}/{m.attempt}/{f.path}" for f in m.files]
        )
        published = fs.cat_file(f"{folder}/{MANIFEST}").decode()
        assert Manifest.model_validate_json(published).path == m.uri and "testing" not in published  # no secrets

    # Lineage is a local file (beside the mirror) and records the s3:// URIs, never the local copies.
    store = ArtifactStore(cfg.root)
    assert store.lineage_path.is_relative_to(tmp_path / "home")
    with duckdb.connect(str(store.lineage_path), read_only=True) as con:
        uris = dict(con.execute("SELECT stage, uri FROM artifacts").fetchall())
    assert uris == {k: f"s3://tokenmill/runs/{k}/{m.fingerprint}" for k, (m, _) in remote.items()}

    # A rerun on the same root reuses every artifact and uploads nothing.
    before = _objects(fs, "tokenmill/runs/")
    again = _run_data_stages(cfg, "s3-2")
    assert all(reused for _, reused in again.values()) and _objects(fs, "tokenmill/runs/") == before

    # Another machine (an empty mirror) reuses them too, downloading only what a rebuilt stage reads.
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path / "home2"))
    tokenize = remote["tokenize"][0]
    fs.rm(f"tokenmill/runs/tokenize/{tokenize.fingerprint}/{MANIFEST}")  # a publish killed before its commit point
    assert ArtifactStore(cfg.root).load("tokenize", tokenize.fingerprint) is None
    with pytest.raises(CorruptArtifactError, match="no longer published"):  # e.g. a stale Prefect cache entry
        ArtifactStore(cfg.root).verify(tokenize)
    fresh = _run_data_stages(cfg, "s3-3")
    assert [k for k, (_, reused) in fresh.items() if not reused] == ["tokenize"]
    rebuilt = fresh["tokenize"][0]
    assert rebuilt.content_hash == tokenize.content_hash and rebuilt.attempt != tokenize.attempt
    # tokenize's parts read the dedup shards by URI: only the tokenizer came down, as a read-only local copy
    assert not Path(fresh["ingest"][0].path).exists() and not Path(fresh["dedup"][0].path).exists()
    tokenizer_copy = [p for p in Path(fresh["tokenizer"][0].path).rglob("*") if p.is_file() and p.name != MANIFEST]
    assert tokenizer_copy and all(p.stat().st_mode & 0o222 == 0 for p in tokenizer_copy)

    # What lineage recorded resolves: ledger queries and dedup's `against` read verified local copies.
    (ledger,) = LineageStore(store.lineage_path, read_only=True).ledger_files("s3-1", ("clean",))
    assert Path(ledger).is_relative_to(tmp_path / "home2") and pq.read_metadata(ledger).num_rows == 50
    assert not Path(fresh["clean"][0].path).exists()  # only the ledger came down: ledger/ and ledger-index/
    copy = Path(ledger).parent.parent
    assert {p.relative_to(copy).parts[0] for p in copy.rglob("*") if p.is_file()} - {MANIFEST} == {
        "ledger",
        "ledger-index",
    }
    q = LineageQueries(LineageStore(store.lineage_path, read_only=True))
    doc = pq.read_table(ledger, columns=["doc_id"]).column("doc_id")[0].as_py()
    assert [r["stage"] for r in q.doc(doc, "s3-1")["stages"]][:2] == ["ingest", "clean"]
    assert not Path(fresh["ingest"][0].path).exists()  # its ledger copy answered, not a download of the docs
    assert resolve_previous("latest", cfg.root).fingerprint == remote["dedup"][0].fingerprint
    assert resolve_previous(remote["dedup"][0].uri, cfg.root).content_hash == remote["dedup"][0].content_hash


@pytest.mark.slow
def test_share_nothing_workers_publish_the_same_artifacts(s3_root_env, tmp_path: Path, monkeypatch):
    """Dask workers with their own scratch and home get only s3:// URIs for the parts of every data stage (ingest,
    clean, dedup, tokenize and its own-split decontamination index): they read their inputs from the store and
    upload their outputs into the attempt folder (ingest's fragments into the root's cache); hashes match a
    local run."""
    distributed = pytest.importorskip("distributed")
    from tasks.parts import DaskExecutor

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("tm-share")
    write_corpus(tmp_path / "corpus")
    words = prose(5).split(" ")
    words[7], words[19] = "altered", "changed"
    (tmp_path / "corpus" / "docs" / "near_copy_of_prose_05.txt").write_text(" ".join(words))
    fs.put(str(tmp_path / "corpus") + "/", "tm-share/corpus/", recursive=True)
    options = {"endpoint_url": s3_root_env, "key": "testing", "secret": "testing"}
    sources = [
        {"name": "docs", "path": "s3://tm-share/corpus/docs", "storage_options": options},
        {"name": "records", "path": "s3://tm-share/corpus/records.jsonl.gz", "storage_options": options},
    ]
    local = _run_data_stages(tiny_config(tmp_path / "corpus", tmp_path / "local", sources=sources), "local")
    assert local["dedup"][0].counts["near_duplicates"]["verified_pairs"] >= 1  # verification parts run too

    sent: dict[str, list] = {}
    dask_map, dask_imap = DaskExecutor.map, DaskExecutor.imap

    def recorded(self, fn, parts):
        sent.setdefault(getattr(fn, "__name__", "?"), []).extend(parts)
        return dask_map(self, fn, parts)

    def recorded_stream(self, fn, items, window):  # parts that report progress (ingest, clean)
        items = list(items)
        sent.setdefault(getattr(fn, "__name__", "?"), []).extend(items)
        return dask_imap(self, fn, items, window)

    monkeypatch.setattr(DaskExecutor, "map", recorded)
    monkeypatch.setattr(DaskExecutor, "imap", recorded_stream)
    worker_home = tmp_path / "worker-home"
    cluster_kwargs = {"n_workers": 2, "threads_per_worker": 1, "host": "127.0.0.1", "dashboard_address": None}
    with distributed.LocalCluster(**cluster_kwargs, env={"TOKENMILL_HOME": str(worker_home)}) as cluster:
        cfg = tiny_config(
            tmp_path / "corpus",
            "s3://tm-share/root",
            sources=sources,
            executor="dask",
            executor_address=cluster.scheduler_address,
        )
        remote = _run_data_stages(cfg, "share-1")
    assert {k: m.content_hash for k, (m, _) in remote.items()} == {k: m.content_hash for k, (m, _) in local.items()}
    locations = {
        "ingest_part": lambda jobs: [loc for j in jobs for loc in (j.cache, j.fragment, j.scratch_to)],
        "write_docs_shard": lambda shard: [shard.out] + [b.fragment for w in shard.writes for b in w.batches],
        "clean_part": lambda part: [part.out_dir] + [path for path, _ in part.units],
        "sign_part": lambda part: [part.doc_path, part.out],
        "band_pairs": lambda part: list(part.band_files),
        "verify_part": lambda part: list(part.doc_paths),
        "write_kept_shard": lambda shard: [shard.out] + [batch.source for batch, _, _ in shard.pieces],
        "own_split_part": lambda part: [part.doc_path, part.out],
        "tokenize_part": lambda part: [part.doc_path, part.tokenizer, part.out],
    }
    assert set(locations) <= set(sent)
    for name, where in locations.items():
        assert all(loc.startswith("s3://tm-share/root/") for part in sent[name] for loc in where(part)), name
    assert all(job.source.path.startswith("s3://tm-share/corpus/") for part in sent["ingest_part"] for job in part)
    assert {f.path.split("/")[0] for f in remote["clean"][0].files} >= {"docs", "ledger", "ledger-index"}
    # Nothing of the workers' is left behind: no scratch prefixes in the attempt folders, no local mirror.
    for stage in ("ingest", "clean", "dedup", "tokenize"):
        m = remote[stage][0]
        listed = fs.find(f"tm-share/root/{stage}/{m.fingerprint}/")
        assert not [f for f in listed if "/.parts/" in f or "/.work/" in f]
        assert sorted(listed) == sorted(
            [f"tm-share/root/{stage}/{m.fingerprint}/{MANIFEST}"]
            + [f"tm-share/root/{stage}/{m.fingerprint}/{m.attempt}/{f.path}" for f in m.files]
        )
    assert not worker_home.exists()


def test_lineage_snapshot_next_to_the_artifacts_is_restored_on_a_fresh_machine(s3_root_env, tmp_path, monkeypatch):
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("tm-lineage")
    write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / "corpus", "s3://tm-lineage/root")
    for run_id in ("snap-1", "snap-2"):
        store = ArtifactStore(cfg.root)
        record = RunRecorder(LineageStore(store.lineage_path), run_id, backup=store.backup_lineage)
        record.start(cfg)
        started = datetime.now(UTC)
        manifest, reused = run_stage("ingest", cfg, {}, run_id=run_id, log=lambda m: None)
        record.stage_done("ingest", started, manifest, reused)
        record.finish()
    pointer = json.loads(fs.cat_file("tm-lineage/root/lineage/LATEST"))
    assert pointer["run_id"] == "snap-2"
    assert fs.ls("tm-lineage/root/lineage/", detail=False) == sorted(
        [f"tm-lineage/root/lineage/{pointer['object']}", "tm-lineage/root/lineage/LATEST"]
    )  # the earlier snapshot is gone once the pointer moved on

    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path / "fresh-machine"))
    fresh = ArtifactStore(cfg.root)
    assert not (fresh.root / "lineage.duckdb").exists()
    runs = LineageStore(fresh.lineage_path, read_only=True).runs()
    assert {r["run_id"] for r in runs} == {"snap-1", "snap-2"}
    out = CliRunner().invoke(app, ["lineage", "runs", "--root", cfg.root])
    assert out.exit_code == 0 and "snap-2" in out.output


def test_interrupted_publish_is_invisible_and_rebuilt(s3_root_env, tmp_path: Path, monkeypatch):
    """Files uploaded, process dies before the manifest: no artifact exists, the next run publishes it whole."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("tm-faults")
    write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / "corpus", "s3://tm-faults/root")
    monkeypatch.setenv("TOKENMILL_FAULT", "ingest:publish")
    monkeypatch.setenv("TOKENMILL_FAULT_DIR", str(tmp_path / "faults"))
    with pytest.raises(InjectedFault):
        run_stage("ingest", cfg, {}, log=lambda m: None)
    # No manifest, and the failed attempt's uploads were removed; only the content-keyed fragment cache stays.
    assert [f for f in fs.find("tm-faults/root/") if not f.startswith("tm-faults/root/.cache/ingest/")] == []

    manifest, reused = run_stage("ingest", cfg, {}, log=lambda m: None)
    assert not reused and fs.exists(f"tm-faults/root/ingest/{manifest.fingerprint}/{MANIFEST}")
    assert manifest.counts["files"]["read"] == 0  # every file's fragment came from the cache on the root

    # A corrupted object (resized) is caught on reuse: the manifest is moved aside and the artifact rebuilt.
    victim = f"tm-faults/root/ingest/{manifest.fingerprint}/{manifest.attempt}/{manifest.files[0].path}"
    fs.pipe_file(victim, b"truncated")
    rebuilt, reused = run_stage("ingest", cfg, {}, log=lambda m: None)
    assert not reused and rebuilt.content_hash == manifest.content_hash and rebuilt.attempt != manifest.attempt
    assert any(".corrupt-" in name for name in fs.find(f"tm-faults/root/ingest/{manifest.fingerprint}/"))


def test_ingest_fragments_on_the_root_are_reused_by_a_fresh_machine_and_checked(s3_root_env, tmp_path, monkeypatch):
    """Ingest's per-file fragments live on the root: another machine (empty mirror, no file state) reuses them
    after hashing the files, and a damaged one is read again, with the same artifact either way."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("tm-frag")
    write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / "corpus", "s3://tm-frag/root")
    first, _ = run_stage("ingest", cfg, {}, log=lambda m: None)
    fragments = sorted(f for f in fs.find("tm-frag/root/.cache/ingest/fragments/") if f.endswith(".arrow"))
    assert first.counts["files"]["read"] == len(fragments) > 0
    assert not (ArtifactStore(cfg.root).cache_dir("ingest") / "fragments").exists()  # nothing cached locally

    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path / "machine-2"))
    fs.pipe_file(fragments[0], b"not an arrow file")  # damaged in the store (its seal no longer matches)
    logged: list[str] = []
    again, reused = run_stage("ingest", cfg, {}, force=True, log=logged.append)
    assert not reused and again.content_hash == first.content_hash
    files = again.counts["files"]
    assert (files["read"], files["reused"], files["rebuilt"]) == (0, len(fragments), 1)
    assert any("not trusted" in line for line in logged)


def test_two_machines_racing_on_one_fingerprint_publish_once(s3_root_env, tmp_path: Path, monkeypatch):
    """Two builders with their own mirrors (no shared lock): the conditional put lets exactly one commit."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("tm-race")
    stores = []
    for machine in ("a", "b"):
        monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path / machine))
        stores.append(ArtifactStore("s3://tm-race/root"))
    both_built = threading.Barrier(2, timeout=30)

    def produce(ctx: StageContext) -> dict:
        (ctx.out_dir / "part.bin").write_bytes(b"same bytes" * 1000)
        both_built.wait()  # neither has committed yet
        return {"rows": 1}

    with ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(
                lambda store: store.build(
                    StageKey(stage="s", version="1", params={}, inputs=[]), produce, log=lambda m: None
                ),
                stores,
            )
        )
    assert sorted(reused for _, reused in results) == [False, True]
    winner = next(m for m, reused in results if not reused)
    assert {m.attempt for m, _ in results} == {winner.attempt}
    assert stores[0].remote.attempts() == [("s", winner.fingerprint, winner.attempt)]  # the loser's is gone

    # Attempts no manifest names (a killed publisher's) are garbage once old enough; the committed one stays.
    old, recent = "attempt-20200101T000000-0badf00d", f"attempt-{datetime.now(UTC):%Y%m%dT%H%M%S}-0badf00d"
    for attempt in (old, recent):
        fs.pipe_file(f"tm-race/root/s/{winner.fingerprint}/{attempt}/part.bin", b"partial")
    assert stores[0].remove_orphaned_attempts() == [f"s3://tm-race/root/s/{winner.fingerprint}/{old}"]
    assert {a for _, _, a in stores[0].remote.attempts()} == {winner.attempt, recent}
    assert stores[1].build(StageKey(stage="s", version="1", params={}, inputs=[]), produce)[0].attempt == winner.attempt
