"""Hostile input for ingest: damaged compressed files, records that break a parser, file names that are not
UTF-8, and a fragment cache that is raced, interrupted or corrupted. Each must cost only what is damaged."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from storage.artifacts import StageContext
from storage.hashing import stream_hash
from tasks.config import SourceConfig
from tasks.data import ingest as ingest_module
from tasks.data import readers, streams
from tasks.data.ingest import fragment_path, ingest, ingest_part, plan_ingest
from tasks.data.readers import list_files
from tasks.stages import data_version
from tests.support.corpus import prose, tiny_config

RECORDS = [{"text": prose(i), "n": i} for i in range(40)]
JSONL = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()


def _source(path: Path, **options) -> SourceConfig:
    options.setdefault("include_ext", [".jsonl", ".gz", ".zst", ".txt", ".parquet"])
    return SourceConfig(name="s", path=str(path), **options)


def _ingest(source: SourceConfig, out: Path, cache: Path | None = None) -> tuple[dict, list[dict], list[dict]]:
    ctx = StageContext(out, out.with_name(out.name + "-work"), log=lambda m: None)
    counts = ingest([source], ctx, cache, workers=1)
    ledger = pq.read_table(out / "ledger").to_pylist()
    assert len(ledger) == counts["docs_in"] == counts["kept"] + sum(counts["dropped"].values())
    return counts, ledger, pq.read_table(out / "docs").to_pylist()


def _one_file(tmp_path: Path, name: str, data: bytes) -> Path:
    folder = tmp_path / "src"
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(data)
    return folder


# --- 1. damaged compressed files keep the records before the damage --------------------------------------------


def _zst_frames(data: bytes, n: int) -> bytes:
    """``data`` as ``n`` concatenated zstd frames, cut at line ends."""
    lines = data.splitlines(keepends=True)
    step = -(-len(lines) // n)
    return b"".join(
        zstandard.ZstdCompressor().compress(b"".join(lines[i : i + step])) for i in range(0, len(lines), step)
    )


DAMAGES = {
    "gz trailing garbage": ("x.jsonl.gz", gzip.compress(JSONL) + b"not a gzip member", 40, "corrupt:BadGzipFile"),
    "zst trailing garbage": ("x.jsonl.zst", zstandard.ZstdCompressor().compress(JSONL) + b"garbage!", 40, "corrupt:"),
    "zst trailing zeros": ("x.jsonl.zst", zstandard.ZstdCompressor().compress(JSONL) + b"\0" * 64, 40, "corrupt:"),
    "zst trailing partial frame": (
        "x.jsonl.zst",
        zstandard.ZstdCompressor().compress(JSONL) + zstandard.ZstdCompressor().compress(JSONL)[:20],
        40,
        "truncated:EOFError",
    ),
    "zst damaged second frame": (
        "x.jsonl.zst",
        _zst_frames(JSONL, 2)[: len(_zst_frames(JSONL, 2)) // 2 + 40] + b"\xff" * 64,
        20,
        ("corrupt:", "truncated:"),  # the damage may read as a cut frame
    ),
    "gz cut": ("x.jsonl.gz", gzip.compress(JSONL)[:-100], None, "truncated:EOFError"),
}


@pytest.mark.parametrize("case", DAMAGES)
def test_damaged_compressed_jsonl_keeps_the_records_before_the_damage(tmp_path: Path, case: str):
    name, data, intact, reason = DAMAGES[case]
    counts, ledger, docs = _ingest(_source(_one_file(tmp_path, name, data)), tmp_path / "out")
    kept = [d["locator"] for d in docs]
    assert kept == [f"{name}:{i}" for i in range(1, len(kept) + 1)], "the records before the damage, in order"
    if intact is not None:
        assert len(kept) >= intact
    assert [d["text"] for d in docs] == [r["text"] for r in RECORDS[: len(kept)]]
    tail = [r for r in ledger if r["fate"] == "dropped"]
    assert len(tail) == 1 and tail[0]["reason"].startswith(reason) and tail[0]["locator"].endswith("-")
    files = pq.read_table(tmp_path / "out" / "files").to_pylist()
    assert files[0]["error"] == tail[0]["reason"]


# --- 2. one record that breaks the parser costs one record ---------------------------------------------------


def _nested(depth: int) -> object:
    value: object = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def test_a_record_that_breaks_the_parser_costs_only_that_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    lines = [
        json.dumps({"text": prose(1)}),
        json.dumps({"text": prose(2), "meta": _nested(300)}),  # orjson serializes at most 254 levels
        json.dumps({"text": prose(3)}),
        "[" * 5000 + "]" * 5000,  # past orjson's parse depth limit
        json.dumps({"text": "any other exception while building this record"}),
        json.dumps({"text": prose(5)}),
    ]
    real = readers._record_from_object

    def fails_on_one(locator, obj, source, scores):
        if obj.get("text", "").startswith("any other exception"):
            raise RuntimeError("a reader bug on one record")
        return real(locator, obj, source, scores)

    monkeypatch.setattr(readers, "_record_from_object", fails_on_one)
    counts, ledger, docs = _ingest(
        _source(_one_file(tmp_path, "r.jsonl", ("\n".join(lines) + "\n").encode())), tmp_path / "o"
    )
    reasons = {r["locator"]: r["reason"] for r in ledger}
    assert reasons == {
        "r.jsonl:1": None,
        "r.jsonl:2": "unserializable_metadata",
        "r.jsonl:3": None,
        "r.jsonl:4": "malformed_json",
        "r.jsonl:5": "record_error:RuntimeError",
        "r.jsonl:6": None,
    }
    assert [d["text"] for d in docs] == [prose(1), prose(3), prose(5)]


def test_a_parquet_row_with_invalid_utf8_costs_only_that_row(tmp_path: Path):
    texts = pa.array([prose(1).encode(), b"caf\xe9 " * 20, prose(3).encode()], pa.binary()).view(pa.string())
    ids = pa.array([b"a", b"\xff", b"c"], pa.binary()).view(pa.string())
    folder = tmp_path / "src"
    folder.mkdir()
    pq.write_table(pa.table({"text": texts, "id": ids, "lang": ["en", "fr", "en"]}), folder / "t.parquet")
    _, ledger, docs = _ingest(_source(folder), tmp_path / "drop")
    assert [r["reason"] for r in ledger] == [None, "invalid_utf8", None]
    assert [d["text"] for d in docs] == [prose(1), prose(3)]
    _, ledger, docs = _ingest(_source(folder, on_invalid_utf8="replace", id_field="id"), tmp_path / "replace")
    assert [r["reason"] for r in ledger] == [None, "record_error:UnicodeDecodeError", None]  # its id is not text


# --- 3. file names that are not valid UTF-8 ----------------------------------------------------------------------


def test_file_names_that_are_not_utf8_get_an_escaped_locator_that_round_trips(tmp_path: Path):
    root = tmp_path / "src"
    raw = os.fsencode(root)
    os.makedirs(raw + b"/dir\xff", exist_ok=True)
    for name in (b"/caf\xe9.txt", b"/dir\xff/inner.txt", b"/a\\b\xfe.txt", b"/x\xff.txt"):
        with open(raw + name, "w") as fh:
            fh.write(prose(len(name)))
    (root / "x\\xff.txt").write_text(prose(99))  # a real name equal to the escaped form of b"x\xff.txt"
    source = _source(root)
    counts, ledger, docs = _ingest(source, tmp_path / "out")
    kept = sorted(d["locator"] for d in docs)
    assert kept == sorted(["caf\\xe9.txt", "dir\\xff/inner.txt", "a\\\\b\\xfe.txt", "x\\xff.txt"])
    for locator in kept:  # the escaped locator leads back to the file's bytes
        name = streams.original_name(locator) if locator != "x\\xff.txt" else locator.encode()
        assert os.path.exists(raw + b"/" + name)
    assert next(d for d in docs if d["locator"] == "x\\xff.txt")["text"] == prose(99)
    files = pq.read_table(tmp_path / "out" / "files").to_pylist()
    read = {r["rel"]: r for r in files if r["error"] is None}
    assert set(read) == set(kept) and read["caf\\xe9.txt"]["uri"].endswith("/src/caf\\xe9.txt")
    collisions = [r for r in files if r["error"] == "undecodable_name_collision"]
    assert [r["rel"] for r in collisions] == ["x\\xff.txt"] and counts["source_errors"] == {
        "undecodable_name_collision": 1
    }
    cfg = tiny_config(root, tmp_path / "root", sources=[{"name": "s", "path": str(root)}])
    assert data_version(cfg)  # the source snapshot in the ingest fingerprint
    assert len(list_files(source)) == 5


# --- 4. the fragment cache: keyed by what was read, failures never cached, entries verified ----------------------


def _corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(4):
        (folder / f"f{i}.txt").write_text(prose(i))
    (folder / "r.jsonl").write_bytes(JSONL[:4000].rsplit(b"\n", 1)[0] + b"\n")
    return folder


def test_a_file_rewritten_between_hashing_and_reading_is_cached_under_what_was_read(tmp_path: Path):
    folder, cache = _corpus(tmp_path), tmp_path / "cache"
    source = _source(folder)
    plan = plan_ingest([source], cache)
    target = folder / "f1.txt"
    job = next(j for j in plan.jobs if j.file.rel == "f1.txt")
    old_digest = job.content_hash
    target.write_text(prose(500))  # rewritten after the plan hashed it
    done = ingest_part([job])[0]
    with open(target, "rb") as fh:
        assert done.content_hash == stream_hash(fh) != old_digest
    assert not fragment_path(cache, source, "f1.txt", old_digest).exists()
    target.write_text(prose(1))  # the old content is back: its text must be the old text, not the rewrite
    _, _, docs = _ingest(source, tmp_path / "out", cache)
    assert next(d for d in docs if d["locator"] == "f1.txt")["text"] == prose(1)


def test_a_read_interrupted_by_an_io_error_is_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder, cache = _corpus(tmp_path), tmp_path / "cache"
    source = _source(folder)
    real = streams.HashedInput.readinto
    planned = {"done": False}

    def eio():
        raise OSError(5, "Input/output error")

    def flaky(self, buffer):  # the plan hashes every file first; then the read of f2.txt fails once with EIO
        if planned["done"] and getattr(self._inner, "name", "").endswith("f2.txt"):
            return self._guarded(eio)  # as if the disk's read failed beneath the stream
        return real(self, buffer)

    real_plan = ingest_module.plan_ingest

    def plan_then_fail(*args):
        plan = real_plan(*args)
        planned["done"] = True
        return plan

    monkeypatch.setattr(streams.HashedInput, "readinto", flaky)
    monkeypatch.setattr(ingest_module, "plan_ingest", plan_then_fail)
    counts, ledger, _ = _ingest(source, tmp_path / "r1", cache)
    assert {r["locator"]: r["reason"] for r in ledger}["f2.txt"] == "unreadable:OSError"
    monkeypatch.undo()
    assert not list((cache / "tmp").iterdir()), "the interrupted read's scratch fragment is gone"
    counts, ledger, docs = _ingest(source, tmp_path / "r2", cache)
    assert {r["locator"]: r["reason"] for r in ledger}["f2.txt"] is None  # read again, not 'unreadable' forever
    assert counts["files"]["read"] == 1 and counts["dropped"] == {}


def _flip_random_bit(path: Path, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    i = rng.randrange(len(data))
    data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("flips", [pytest.param(40, id="40-flips"), pytest.param(300, marks=pytest.mark.slow)])
def test_random_bit_flips_in_the_cache_never_crash_or_change_data(tmp_path: Path, flips: int):
    folder = _corpus(tmp_path)
    source = _source(folder)
    pristine = tmp_path / "cache-pristine"
    _, expected_ledger, expected_docs = _ingest(source, tmp_path / "first", pristine)
    entries = sorted(p for p in pristine.rglob("*") if p.is_file())
    assert any(p.suffix == ".arrow" for p in entries) and any(p.suffix == ".seal" for p in entries)
    rng = random.Random(18)
    rebuilt = 0
    for k in range(flips):
        cache = tmp_path / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.copytree(pristine, cache)
        victim = cache / rng.choice(entries).relative_to(pristine)
        _flip_random_bit(victim, rng)
        out = tmp_path / f"run{k}"
        counts, ledger, docs = _ingest(source, out, cache)
        assert docs == expected_docs and ledger == expected_ledger, f"flip in {victim.name} changed the data"
        rebuilt += counts["files"].get("rebuilt", 0)
        shutil.rmtree(out)
        shutil.rmtree(out.with_name(out.name + "-work"), ignore_errors=True)
    assert rebuilt > 0


def _replace_with_folder(path: Path) -> None:
    path.unlink()
    (path / "junk").mkdir(parents=True)


CACHE_DAMAGES = {
    "fragment truncated": lambda c: next((c / "fragments").glob("*.arrow")).write_bytes(b""),
    "fragment deleted": lambda c: next((c / "fragments").glob("*.arrow")).unlink(),
    "seal deleted": lambda c: next((c / "fragments").glob("*.seal")).unlink(),
    "seal of another fragment": lambda c: shutil.copy(*sorted((c / "fragments").glob("*.seal"))[:2]),
    "fragment is a folder": lambda c: _replace_with_folder(next((c / "fragments").glob("*.arrow"))),
    "seal is a folder": lambda c: _replace_with_folder(next((c / "fragments").glob("*.seal"))),
    "state is a folder": lambda c: _replace_with_folder(next((c / "state").glob("*.json"))),
    "state is not JSON": lambda c: next((c / "state").glob("*.json")).write_text("{not json"),
    "tmp is a file": lambda c: (shutil.rmtree(c / "tmp"), (c / "tmp").write_text("x")),
}


@pytest.mark.parametrize("damage", CACHE_DAMAGES)
def test_cache_entries_deleted_replaced_or_truncated_are_rebuilt(tmp_path: Path, damage: str):
    source = _source(_corpus(tmp_path))
    cache = tmp_path / "cache"
    _, expected_ledger, expected_docs = _ingest(source, tmp_path / "first", cache)
    CACHE_DAMAGES[damage](cache)
    _, ledger, docs = _ingest(source, tmp_path / "again", cache)
    assert docs == expected_docs and ledger == expected_ledger
    counts, _, docs = _ingest(source, tmp_path / "healed", cache)  # and the cache is whole again
    assert docs == expected_docs and counts["files"]["read"] == 0 and "rebuilt" not in counts["files"]
