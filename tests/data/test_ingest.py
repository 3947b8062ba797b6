"""Ingest readers, bad input accounting, incremental refresh and fan-out, called as plain functions."""

from __future__ import annotations

import gzip
import json
import os
import resource
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from storage.artifacts import ArtifactStore, StageContext
from tasks.config import CleanConfig, SourceConfig
from tasks.data.clean import clean
from tasks.data.ingest import doc_id_for, ingest
from tests.support.corpus import prose, write_prose_jsonl


def _run(sources: list[SourceConfig], out: Path, cache: Path | None = None, **kwargs) -> tuple[dict, list[dict]]:
    ctx = StageContext(out, out.with_name(out.name + "-work"), log=lambda m: None)
    counts = ingest(sources, ctx, cache, **kwargs)
    return counts, pq.read_table(out / "ledger").to_pylist()


def _docs(out: Path) -> list[dict]:
    return pq.read_table(out / "docs").to_pylist()


def _source(name: str, path: Path | str, **options) -> SourceConfig:
    return SourceConfig(name=name, path=str(path), **options)


def test_reads_jsonl_gz_zst_and_parquet_with_ids_and_metadata(tmp_path: Path):
    rows = [{"text": prose(i), "id": f"doc-{i}", "lang": "en"} for i in range(3)]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_bytes(data)
    (src / "b.jsonl.gz").write_bytes(gzip.compress(data))
    (src / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    pq.write_table(
        pa.Table.from_pylist([{"body": r["text"], "key": r["id"], "score": 0.5} for r in rows]), src / "d.parquet"
    )
    counts, ledger = _run([_source("j", src, id_field="id", include_ext=[".jsonl", ".gz", ".zst"])], tmp_path / "out1")
    docs = _docs(tmp_path / "out1")
    assert len(docs) == 9 and all(r["fate"] == "kept" for r in ledger)
    assert {d["locator"] for d in docs} >= {"a.jsonl:1", "b.jsonl.gz:2", "c.jsonl.zst:3"}
    assert json.loads(docs[0]["metadata"]) == {"id": "doc-0", "lang": "en"}
    # the same id in another record (here: file) is another record: it gets an id of its own; dedup finds the copy
    assert docs[0]["doc_id"] != docs[3]["doc_id"] and counts["repeated_ids"] == {"j": 6}
    assert len({r["doc_id"] for r in ledger}) == len(ledger)
    _run([_source("p", src / "d.parquet", text_field="body", id_field="key")], tmp_path / "out2")
    docs = _docs(tmp_path / "out2")
    assert [d["text"] for d in docs] == [r["text"] for r in rows]
    assert json.loads(docs[1]["metadata"]) == {"score": 0.5}


def test_text_files_split_into_documents_by_rule(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "book.txt").write_text("first paragraph\nstill first\n\n\nsecond\n \nthird\n")
    _run([_source("para", src, split="paragraph")], tmp_path / "p")
    assert [d["locator"] for d in _docs(tmp_path / "p")] == ["book.txt#1", "book.txt#2", "book.txt#3"]
    _run([_source("re", src, split="regex", split_pattern=r"\nsecond\n")], tmp_path / "r")
    assert [d["text"] for d in _docs(tmp_path / "r")] == ["first paragraph\nstill first\n\n", " \nthird\n"]
    _run([_source("whole", src)], tmp_path / "w")
    assert len(_docs(tmp_path / "w")) == 1


def test_fsspec_uris_read_like_local_paths(tmp_path: Path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus/x/one.txt", prose(1).encode())
    fs.pipe("/corpus/two.jsonl", (json.dumps({"text": prose(2)}) + "\n").encode())
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "one.txt").write_text(prose(1))
    counts, _ = _run([_source("mem", "memory://corpus")], tmp_path / "m")
    assert counts["kept"] == 2 and {d["locator"] for d in _docs(tmp_path / "m")} == {"x/one.txt", "two.jsonl:1"}
    _run([_source("uri", f"file://{tmp_path / 'local'}")], tmp_path / "f")
    assert _docs(tmp_path / "f")[0]["text"] == prose(1)


def _bad_corpus(root: Path) -> dict[str, str]:
    """Every kind of bad input; returns file → the reason (or file-level error) it must be recorded with."""
    root.mkdir()
    expect: dict[str, str] = {}
    good = json.dumps({"text": prose(7)}) + "\n"
    (root / "ok.txt").write_text(prose(1))
    expect["ok.txt"] = "kept"
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 20)
    expect["latin1.txt"] = "invalid_utf8"
    (root / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    expect["binary.txt"] = "binary"
    (root / "empty.txt").write_text("")
    expect["empty.txt"] = "kept"  # an empty document: clean drops it as "empty"
    (root / "empty.jsonl").write_text("")
    expect["empty.jsonl"] = "no_records"
    (root / "big.txt").write_text("x" * 5000)
    expect["big.txt"] = "too_large_file"
    lines = good + "{not json\n" + json.dumps({"body": "no text"}) + "\n" + "[1, 2]\n" + good
    (root / "mixed.jsonl").write_text(lines)
    expect["mixed.jsonl"] = "malformed_json,missing_text_field"
    (root / "badutf8.jsonl").write_bytes(b'{"text": "caf\xe9 au lait"}\n')
    expect["badutf8.jsonl"] = "invalid_utf8"
    payload = gzip.compress((good * 2000).encode())
    (root / "cut.jsonl.gz").write_bytes(payload[: len(payload) // 2])
    expect["cut.jsonl.gz"] = "truncated:EOFError"
    payload = zstandard.ZstdCompressor().compress((good * 2000).encode())
    (root / "cut.jsonl.zst").write_bytes(payload[: len(payload) // 2])
    expect["cut.jsonl.zst"] = "truncated:EOFError"
    (root / "huge.jsonl").write_bytes(b'{"text": "' + b"a" * (100 * 2**20) + b'"}\n' + good.encode())
    expect["huge.jsonl"] = "too_large_record"
    (root / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    expect["corrupt.parquet"] = "unreadable"
    pq.write_table(pa.table({"body": ["a", "b"]}), root / "notext.parquet")
    expect["notext.parquet"] = "missing_text_field"
    os.symlink(root / "nowhere.txt", root / "dangling.txt")
    expect["dangling.txt"] = "unreadable:FileNotFoundError"
    os.symlink(root / "loop.txt", root / "loop.txt")
    expect["loop.txt"] = "unreadable:OSError"
    os.symlink(root, root / "self")
    expect["self"] = "symlinked_dir_skipped"
    deep = root.joinpath(*["d"] * 300)
    deep.mkdir(parents=True)
    (deep / "deep.txt").write_text(prose(3))
    expect["/".join(["d"] * 300) + "/deep.txt"] = "kept"
    if os.geteuid() != 0:  # root reads everything: the permission case only means something for other users
        (root / "secret.txt").write_text("hidden")
        (root / "secret.txt").chmod(0)
        expect["secret.txt"] = "unreadable:PermissionError"
    return expect


def test_bad_input_never_crashes_and_every_input_is_accounted_for(tmp_path: Path):
    expect = _bad_corpus(tmp_path / "bad")
    source = _source(
        "bad", tmp_path / "bad", max_file_bytes=4096, include_ext=[".txt", ".jsonl", ".gz", ".zst", ".parquet"]
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    counts, ledger = _run([source], tmp_path / "out")
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert rss_growth_mb < 64, "the 100 MB line must be skipped in bounded memory"
    files = {r["rel"]: r for r in pq.read_table(tmp_path / "out" / "files").to_pylist()}
    for rel, expected in expect.items():
        recorded = {r["reason"] or "kept" for r in ledger if r["locator"].split(":")[0].split("#")[0] == rel}
        recorded |= {files[rel]["error"]} if rel in files and files[rel]["error"] else set()
        assert recorded, f"{rel} is not accounted for"
        assert all(any(r.startswith(e) for r in recorded) for e in expected.split(",")), (rel, recorded)
    assert len(ledger) == counts["docs_in"] == counts["kept"] + sum(counts["dropped"].values())
    assert counts["source_errors"] == {"symlinked_dir_skipped": 1}
    # a truncated file keeps the records before the cut and records the rest as one row
    assert sum(r["fate"] == "kept" for r in ledger if r["locator"].startswith("cut.jsonl.gz")) > 0


def test_invalid_utf8_can_be_replaced_and_recorded(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 30)
    (src / "bad.jsonl").write_bytes(b'{"text": "caf\xe9 au lait"}\n')
    counts, ledger = _run([_source("s", src, on_invalid_utf8="replace")], tmp_path / "out")
    assert counts["kept"] == 2
    assert sorted(r["scores"] for r in ledger) == [[("utf8_replacements", 1.0)], [("utf8_replacements", 30.0)]]
    assert "\ufffd" in _docs(tmp_path / "out")[0]["text"]


def test_incremental_ingest_reads_only_new_and_changed_files(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"f{i}.txt").write_text(prose(i))
    cache = tmp_path / "cache"
    source = _source("inc", corpus)
    first, _ = _run([source], tmp_path / "r1", cache)
    assert first["files"]["read"] == 4
    again, _ = _run([source], tmp_path / "r2", cache)
    assert again["files"] == {"unchanged": 4, "removed": 0, "read": 0, "reused": 4}
    assert pq.read_table(tmp_path / "r1" / "docs").equals(pq.read_table(tmp_path / "r2" / "docs"))
    (corpus / "f1.txt").write_text(prose(100))  # changed
    (corpus / "f2.txt").unlink()  # removed
    (corpus / "f9.txt").write_text(prose(9))  # new
    os.utime(corpus / "f3.txt", (1, 1))  # touched, same content: hashed, not re-read
    third, _ = _run([source], tmp_path / "r3", cache)
    assert third["files"] == {"unchanged": 2, "changed": 1, "new": 1, "removed": 1, "read": 2, "reused": 2}
    assert third["removed_files"] == ["inc:f2.txt"]
    ids = {d["locator"]: d["doc_id"] for d in _docs(tmp_path / "r3")}
    assert ids["f0.txt"] == doc_id_for("inc", "f0.txt") and ids["f1.txt"] == doc_id_for("inc", "f1.txt")


def test_fan_out_gives_the_same_artifacts_as_one_process(tmp_path: Path):
    corpus = write_prose_jsonl(tmp_path / "corpus")
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        _run([_source("fan", corpus)], out / "ingest", workers=workers, part_bytes=1, parallel_min_bytes=0)
        table = pq.read_table(out / "ingest" / "docs")
        docs = [out / f"raw-{k}.parquet" for k in range(3)]
        for k, path in enumerate(docs):  # several row groups, so clean has several parts to map
            pq.write_table(table.slice(40 * k, 40), path, row_group_size=10)
        ctx = StageContext(out / "clean", out / "clean-work", log=lambda m: None)
        counts = clean(docs, CleanConfig(min_chars=32), ctx, workers=workers, part_bytes=20_000)
        outs[workers] = ({str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))}, counts)
    assert outs[1][0] == outs[2][0] and outs[1][1] == outs[2][1]
    assert outs[1][1]["docs_in"] == 120 and len([n for n in outs[1][0] if n.startswith("clean/docs/")]) > 2


def test_cache_lives_in_the_data_root(tmp_path: Path):
    assert ArtifactStore(tmp_path).cache_dir("ingest") == tmp_path.resolve() / ".cache" / "ingest"


def test_reader_options_are_validated():
    with pytest.raises(ValueError, match="split_pattern"):
        SourceConfig(name="x", path="y", split="regex")
    with pytest.raises(ValueError, match="not a valid regex"):
        SourceConfig(name="x", path="y", split="regex", split_pattern="(")


def test_stage_reruns_on_source_change_and_reuses_unchanged_files(tmp_path: Path):
    from tasks.stages import run_stage, stage_key
    from tests.support.corpus import tiny_config, write_corpus

    write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / "corpus", tmp_path / "root")
    first, _ = run_stage("ingest", cfg, {}, log=lambda m: None)
    assert stage_key("ingest", cfg, {}).fingerprint == first.fingerprint  # unchanged tree: the Prefect cache hits
    (tmp_path / "corpus" / "docs" / "added.txt").write_text(prose(77))
    assert stage_key("ingest", cfg, {}).fingerprint != first.fingerprint  # (path, size, mtime) snapshot changed
    second, reused = run_stage("ingest", cfg, {}, log=lambda m: None)
    assert not reused and second.counts["files"]["read"] == 1
    assert second.counts["files"]["reused"] == first.counts["files"]["read"]
    assert second.counts["docs_in"] == first.counts["docs_in"] + 1
