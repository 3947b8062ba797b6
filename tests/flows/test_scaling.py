"""The data stages on a Dask cluster of 2 worker processes give the same artifacts as one process."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from storage.artifacts import StageContext
from tasks.config import CleanConfig, SourceConfig
from tasks.data.clean import clean
from tasks.data.ingest import ingest
from tasks.data.tokenize import tokenize
from tasks.parts import DaskExecutor, use_executor
from tasks.stages import UPSTREAM, run_stage
from tests.support.corpus import prose, tiny_config, write_corpus

distributed = pytest.importorskip("distributed")

DATA_STAGES = ("ingest", "clean", "dedup", "tokenizer", "tokenize")


def _data_stages(cfg) -> dict[str, str]:
    manifests = {}
    for name in DATA_STAGES:
        manifests[name], _ = run_stage(name, cfg, {u: manifests[u] for u in UPSTREAM[name]}, log=lambda m: None)
    return {name: m.content_hash for name, m in manifests.items()}


def test_data_stages_on_dask_match_one_process(tmp_path: Path, dask_cluster):
    write_corpus(tmp_path / "corpus")
    local = tiny_config(tmp_path / "corpus", tmp_path / "local", workers=1)
    on_dask = tiny_config(
        tmp_path / "corpus", tmp_path / "dask", executor="dask", executor_address=dask_cluster.scheduler_address
    )
    assert _data_stages(on_dask) == _data_stages(local)
    ran = set(dask_cluster.scheduler.task_prefixes)  # the work did go to the cluster
    parts = {"ingest_part", "write_docs_shard", "clean_part", "sign_part", "band_pairs", "write_kept_shard"}
    assert parts | {"own_split_part", "tokenize_part"} <= ran, ran


def test_many_parts_on_dask_come_back_in_part_order(tmp_path: Path, dask_cluster):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        lines = "".join(json.dumps({"text": prose(10 * i + j)}) + "\n" for j in range(20))
        (corpus / f"part{i}.jsonl").write_text(lines)
    outs = {}
    with distributed.Client(dask_cluster) as client:
        for engine, executor in (("local", None), ("dask", DaskExecutor(client))):
            out = tmp_path / engine
            with use_executor(executor):
                ctx = StageContext(out / "ingest", out / "ingest-work", log=lambda m: None)
                ingest([SourceConfig(name="fan", path=str(corpus))], ctx, workers=1, part_bytes=1)
                table = pq.read_table(out / "ingest" / "docs")
                docs = [out / f"raw-{k}.parquet" for k in range(3)]
                for k, path in enumerate(docs):  # several row groups, so clean has several parts
                    pq.write_table(table.slice(40 * k, 40), path, row_group_size=10)
                ctx = StageContext(out / "clean", out / "clean-work", log=lambda m: None)
                counts = clean(docs, CleanConfig(min_chars=32), ctx, workers=1, part_bytes=20_000)
            files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))}
            outs[engine] = (files, counts)
    assert outs["dask"] == outs["local"]
    assert len([n for n in outs["local"][0] if n.startswith("clean/docs/")]) > 2


def test_tokenize_parts_give_the_same_bytes_on_every_executor(tmp_path: Path, dask_cluster):
    write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / "corpus", tmp_path / "root", workers=1, tokenize={"shard_tokens": 1024})
    manifests = {}
    for name in ("ingest", "clean", "dedup", "tokenizer"):
        manifests[name], _ = run_stage(name, cfg, {u: manifests[u] for u in UPSTREAM[name]}, log=lambda m: None)
    table = pq.read_table(manifests["dedup"].files_under("docs/"))
    docs = []
    for k in range(4):  # four dedup shards: four parts, each with shards of its own
        docs.append(tmp_path / f"docs-{k}.parquet")
        pq.write_table(table.slice(9 * k, 9 if k < 3 else None), docs[-1])
    tokenizer_dir = manifests["tokenizer"].file("")

    def build(name: str, workers: int, executor=None) -> tuple[dict, dict]:
        out = tmp_path / name
        ctx = StageContext(out / "out", out / "work", log=lambda m: None)
        ctx.out_dir.mkdir(parents=True)
        with use_executor(executor):
            counts = tokenize(docs, tokenizer_dir, cfg.tokenizer, cfg.tokenize, ctx, workers=workers)
        return {str(p.relative_to(ctx.out_dir)): p.read_bytes() for p in sorted(ctx.out_dir.rglob("*.*"))}, counts

    one = build("one", 1)
    assert build("two", 2) == one
    with distributed.Client(dask_cluster) as client:
        assert build("dask", 1, DaskExecutor(client)) == one
    files, counts = one
    assert counts["docs_in"] == table.num_rows
    assert len(counts["splits"]["train"]["shards"]) >= 4  # shards end at part boundaries
    names = [s["shard"] for s in counts["splits"]["train"]["shards"]]
    assert names == [f"train-{i:05d}" for i in range(len(names))] and all(f"tokens/{n}.arrow" in files for n in names)


def test_missing_engine_is_a_clear_error(monkeypatch, tmp_path: Path):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / "corpus", tmp_path / "root", executor="ray")
    with pytest.raises(RuntimeError, match=r"tokenmill\[ray\]"):
        run_stage("ingest", cfg, {}, log=lambda m: None)


def test_without_an_address_a_private_local_cluster_runs_the_stage(tmp_path: Path, monkeypatch):
    calls = []
    dask_map, dask_imap = DaskExecutor.map, DaskExecutor.imap

    def counted(self, fn, parts):
        calls.append(fn.__name__)
        return dask_map(self, fn, parts)

    def counted_imap(self, fn, items, window):  # parts reported as they finish (progress) come through imap
        calls.append(fn.__name__)
        return dask_imap(self, fn, items, window)

    monkeypatch.setattr(DaskExecutor, "map", counted)
    monkeypatch.setattr(DaskExecutor, "imap", counted_imap)
    write_corpus(tmp_path / "corpus")
    local = tiny_config(tmp_path / "corpus", tmp_path / "local", workers=1)
    private = tiny_config(tmp_path / "corpus", tmp_path / "private", workers=2, executor="dask")
    hashes = [run_stage("ingest", cfg, {}, log=lambda m: None)[0].content_hash for cfg in (local, private)]
    assert hashes[0] == hashes[1] and calls == ["ingest_part", "write_docs_shard"]
