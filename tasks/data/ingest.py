"""Ingest: read sources (folders of text files, JSONL[.gz|.zst], Parquet; local or fsspec URIs) into raw Parquet.

Every record found becomes exactly one ledger row: ``kept`` (passed on) or ``dropped`` with a reason (see
``tasks.data.readers``). Document ids derive from (source name, locator) — or from the record's own id when the
source names an ``id_field`` — so a document keeps its id across runs.

The work is split in three so it can fan out and refresh incrementally:

1. ``plan_ingest`` lists the files and decides which can reuse a cached per-file fragment: a file whose
   (size, mtime) is unchanged since the last successful run is not opened at all; otherwise its content is
   hashed and a fragment made from identical bytes (and reader settings) is reused.
2. ``ingest_part`` reads a group of files into per-file fragments (one Arrow IPC file each) in the cache; parts
   run in parallel processes (``tasks.parts.map_parts``) and are independent, so a Prefect/Dask/Ray
   mapping over ``plan.parts`` works the same way. Each reports its fragments' batch layout (rows, kept
   documents and their bytes per batch).
3. ``merge_fragments`` reads the fragments' columns other than the text, in file order, into the ledger and
   ``files/`` (ordinals, repeated ids), plans the docs shards exactly as one streaming writer would cut them
   (``plan_docs_shards``) and has one part per shard write it (``write_docs_shard``).

On an object-store root the fragment cache is a prefix of the root (``<root>/.cache/ingest/``) and the docs
shards are uploaded into the attempt folder by the parts that write them, so workers need nothing but the
store; the flow process reads only the fragments' ledger columns.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.artifacts import FileEntry, StageContext, pid_alive, write_json_atomic
from storage.hashing import canonical_json, stable_id, stream_hash
from storage.part_outputs import PARTS_PREFIX, files_in, part_folder, upload_part_files
from storage.remote import is_remote, object_fs, open_input, put_files, remove_prefix
from storage.shards import DOC_SCHEMA, LedgerWriter, ParquetShardWriter, plan_shard_writes
from tasks.config import SourceConfig
from tasks.data import readers
from tasks.data.readers import Record, SourceFile
from tasks.data.streams import open_hashed
from tasks.parts import balanced_groups, default_workers, map_parts
from tasks.stage_contract import DocCounts, StageResult

VERSION = "5"  # 5: repeated id_field values get ids of their own; 4: ledger in sorted parts with an index
FLUSH_ROWS = 1024
FLUSH_BYTES = 2 * 2**20  # also the row-group size of the merged shards: clean maps over row groups
FRAGMENT_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("locator", pa.string()),
        ("ordinal", pa.int64()),
        ("text", pa.large_string()),  # null when dropped
        ("n_bytes", pa.int64()),
        ("metadata", pa.string()),
        ("reason", pa.string()),
        ("score", pa.float64()),
        ("scores", pa.map_(pa.string(), pa.float64())),
    ]
)
FILES_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("rel", pa.string()),
        ("bytes", pa.int64()),
        ("content_hash", pa.string()),
        ("records", pa.int64()),
        ("kept", pa.int64()),
        ("error", pa.string()),
        ("uri", pa.string()),  # where the file was read from: s3://bucket/key, or the local path
    ]
)

list_files = readers.list_files


def doc_id_for(source: str, locator: str) -> str:
    return f"{source}:{stable_id(source, locator)}"


def doc_id_of(source: str, record: Record) -> str:
    return (
        f"{source}:{stable_id(source, 'id', record.key)}"
        if record.key is not None
        else doc_id_for(source, record.locator)
    )


@dataclass(frozen=True)
class FileJob:
    """One file to ingest: its cached fragment (by content) if there is one, else where to read it."""

    source: SourceConfig
    file: SourceFile
    content_hash: str | None  # planned: of the bytes hashed when listing; after reading: of the bytes read
    fragment: str  # this file's fragment (Arrow IPC); "" until read when nothing is cached for it
    cached: bool
    cache: str  # where fragments are cached (fragments/, tmp/): a local folder, or a prefix on the object store
    scratch: bool = False  # the fragment is not a cache entry (the read was interrupted): removed after merging
    rebuilt: str | None = None  # why the cached fragment was not trusted and the file was read again
    scratch_to: str = ""  # remote cache: where a part puts a fragment that is not a cache entry (.parts/)
    batches: tuple[tuple[int, int, int], ...] = ()  # once done: records, kept docs, their Arrow bytes per batch


def _reader_settings(source: SourceConfig) -> str:
    """The source settings that change what a file's records are (not which files are listed)."""
    settings = source.model_dump(exclude={"path", "include_ext", "exclude", "max_files", "storage_options"})
    return json.dumps(settings, sort_keys=True)


def fragment_key(source: SourceConfig, rel: str, content_hash: str) -> str:
    return stable_id(VERSION, _reader_settings(source), rel, content_hash) + content_hash[:16]


def fragment_path(cache: Path, source: SourceConfig, rel: str, content_hash: str) -> Path:
    return cache / "fragments" / f"{fragment_key(source, rel, content_hash)}.arrow"


def _content_hash(fs, f: SourceFile) -> str | None:
    try:
        fh, hashed = open_hashed(fs, f.path)
    except OSError:
        return None  # the reader records why the file cannot be read
    with fh:
        return hashed.digest()


# --- the fragment cache: every entry carries a seal (size and hash of its bytes), checked before it is used ---


def _make_room(path: Path, folder: bool = False) -> Path:
    """Clear ``path`` of what a damaged cache left in the way: a file or dangling link where a folder goes, a
    folder where a file goes (a link to a folder, e.g. a cache on another disk, is kept)."""
    if folder:
        if path.is_symlink() and not path.exists() or path.exists() and not path.is_dir():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
    elif path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    return path


def _seal_path(fragment: Path) -> Path:
    return fragment.with_suffix(".seal")


def _seal(fragment: Path, tmp: Path) -> None:
    """Publish ``tmp`` as ``fragment`` with its seal (the seal last: a fragment without one is not trusted)."""
    with open(tmp, "rb") as fh:
        digest = stream_hash(fh)
    seal = {"fragment": fragment.stem, "bytes": tmp.stat().st_size, "xxh3": digest}
    _make_room(fragment.parent, folder=True)
    os.replace(tmp, _make_room(fragment))  # identical content by construction if another run made it meanwhile
    write_json_atomic(_make_room(_seal_path(fragment)), seal)


def fragment_problem(fragment: Path) -> str | None:
    """Why a cached fragment cannot be trusted (missing or foreign seal, size or hash mismatch), or None."""
    try:
        seal = json.loads(_seal_path(fragment).read_text())
        size = fragment.stat().st_size
    except (OSError, ValueError) as err:
        return f"no readable seal or fragment ({type(err).__name__})"
    if not isinstance(seal, dict) or seal.get("fragment") != fragment.stem:
        return "its seal belongs to another fragment"
    if size != seal.get("bytes"):
        return f"{size} bytes where its seal says {seal.get('bytes')}"
    try:
        with open(fragment, "rb") as fh:
            digest = stream_hash(fh)
    except OSError as err:
        return f"unreadable ({type(err).__name__})"
    return None if digest == seal.get("xxh3") else "its bytes do not match its seal's hash"


def _remove_stale_temporaries(cache: Path) -> None:
    """Fragments being written by processes that died (``tmp/<pid>-…``)."""
    _make_room(cache, folder=True)
    _make_room(cache / "tmp", folder=True)
    for path in (cache / "tmp").glob("*-*"):
        pid = path.name.split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            path.unlink(missing_ok=True)


# --- 1. plan ------------------------------------------------------------------------------------------


def _state_check(files: object) -> str:
    return stable_id("ingest-state", canonical_json(files))


class IngestState:
    """What the last successful ingest saw per source: rel → (size, mtime, content hash). Lives in the cache.

    The file carries a check of its content; a state that fails it (or does not parse) is ignored, so every
    file is hashed again rather than trusted from a damaged record (``problem`` says why).
    """

    def __init__(self, cache_dir: Path, source: SourceConfig):
        self.path = cache_dir / "state" / f"{source.name}-{stable_id(source.resolved_path())}.json"
        self.problem: str | None = None
        self.files: dict[str, list] = self._load()

    def _load(self) -> dict[str, list]:
        try:
            stored = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            self.problem = f"unreadable ({type(err).__name__})"
            return {}
        if not isinstance(stored, dict) or stored.get("check") != _state_check(stored.get("files")):
            self.problem = "its check does not match its content"
            return {}
        return stored["files"]

    def save(self, files: dict[str, list]) -> None:
        _make_room(self.path.parent, folder=True)
        write_json_atomic(_make_room(self.path), {"files": files, "check": _state_check(files)})


@dataclass
class IngestPlan:
    jobs: list[FileJob]
    problems: list[SourceFile]  # listing problems (unreadable folders, symlinked folders skipped)
    status: Counter[str]  # new / changed / unchanged / removed files
    removed: list[str]
    states: dict[str, tuple[IngestState, dict[str, list]]]
    notes: list[str]  # cache entries that were not trusted, for the log


def _sealed_fragments(where: str) -> set[str]:
    """The fragments of a cache on an object store that have their seal beside them (one listing)."""
    fs, key = object_fs(f"{where}/fragments")
    try:
        names = {p.rsplit("/", 1)[1] for p in fs.find(key)}
    except FileNotFoundError:
        return set()
    return {n for n in names if n.endswith(".arrow") and n.removesuffix(".arrow") + ".seal" in names}


def plan_ingest(sources: list[SourceConfig], cache_dir: Path, fragments: str | None = None) -> IngestPlan:
    """Which files to read and which cached fragments to reuse. The per-source state lives in ``cache_dir``;
    the fragments there too, or under ``fragments`` (a prefix on the object-store root, shared by every worker).
    """
    where = fragments or str(cache_dir)
    sealed = _sealed_fragments(where) if is_remote(where) else None
    jobs: list[FileJob] = []
    problems: list[SourceFile] = []
    status: Counter[str] = Counter()
    removed: list[str] = []
    states: dict[str, tuple[IngestState, dict[str, list]]] = {}
    notes: list[str] = []
    for source in sources:
        fs, _ = readers.source_filesystem(source)
        state = IngestState(cache_dir, source)
        if state.problem:
            notes.append(f"ingest: state of source {source.name!r} ignored ({state.problem}): every file is hashed")
        seen: dict[str, list] = {}
        for f in list_files(source):
            if f.error is not None:
                problems.append(f)
                continue
            previous = state.files.get(f.rel)
            if previous and f.size is not None and f.mtime is not None and previous[:2] == [f.size, f.mtime]:
                digest = previous[2]  # unchanged stat: trust the recorded content hash, do not open the file
            else:
                digest = _content_hash(fs, f)
            status["new" if previous is None else "unchanged" if previous[2] == digest else "changed"] += 1
            fragment, cached = "", False
            if digest is not None:
                seen[f.rel] = [f.size, f.mtime, digest]
                if sealed is not None:
                    name = f"{fragment_key(source, f.rel, digest)}.arrow"
                    fragment, cached = f"{where}/fragments/{name}", name in sealed
                else:
                    path = fragment_path(cache_dir, source, f.rel, digest)
                    fragment, cached = str(path), path.exists() and _seal_path(path).exists()
            jobs.append(FileJob(source, f, digest, fragment, cached, where))
        gone = sorted(set(state.files) - {j.file.rel for j in jobs if j.source.name == source.name})
        removed += [f"{source.name}:{rel}" for rel in gone]
        status["removed"] += len(gone)
        states[source.name] = (state, seen)
    return IngestPlan(jobs, problems, status, removed, states, notes)


# --- 2. read files into fragments ------------------------------------------------------------------------


class _FragmentWriter:
    """One file's records as an Arrow IPC file (one row per record: a document, or its drop reason)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []
        self.pending_bytes = 0
        options = pa.ipc.IpcWriteOptions(compression="lz4")
        self._writer = pa.ipc.new_file(str(path), FRAGMENT_SCHEMA, options=options)

    def add(self, row: dict, n_bytes: int) -> None:
        self.rows.append(row)
        self.pending_bytes += n_bytes
        if len(self.rows) >= FLUSH_ROWS or self.pending_bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self._writer.write_batch(pa.RecordBatch.from_pylist(self.rows, schema=FRAGMENT_SCHEMA))
        self.rows, self.pending_bytes = [], 0

    def close(self) -> None:
        self.flush()
        self._writer.close()


def _fragment_row(source: str, ordinal: int, record: Record) -> dict:
    text, reason = (record.text, None) if record.reason is None else (None, record.reason)
    try:
        n_bytes = len(text.encode("utf-8")) if text is not None else 0
    except UnicodeEncodeError:  # a lone surrogate: not storable text
        text, reason, n_bytes = None, "invalid_utf8", 0
    return {
        "doc_id": doc_id_of(source, record),
        "locator": record.locator,
        "ordinal": ordinal,  # position within the file; the merge offsets it
        "text": text,
        "n_bytes": n_bytes,
        "metadata": record.metadata,
        "reason": reason,
        "score": record.scores.get("bytes") if reason else None,
        "scores": record.scores or None,
    }


def _read_into_fragment(job: FileJob) -> FileJob:
    """Read one file into a fragment keyed by the hash of the bytes actually read; return the job as read.

    A file rewritten since it was hashed is cached under its new content's key (never under the old one). A
    read interrupted by an I/O error is a scratch fragment, used once and never cached.
    """
    fs, _ = readers.source_filesystem(job.source)
    cache = Path(job.cache)
    tmp = _make_room(cache / "tmp", folder=True) / f"{os.getpid()}-{uuid.uuid4().hex[:12]}.arrow"
    writer = _FragmentWriter(tmp)
    reading = readers.FileReading(fs, job.file, job.source)
    for ordinal, record in enumerate(reading):
        row = _fragment_row(job.source.name, ordinal, record)
        writer.add(row, row["n_bytes"])
    writer.close()
    if reading.digest is None:
        return replace(job, content_hash=None, fragment=str(tmp), cached=False, scratch=True)
    final = fragment_path(cache, job.source, job.file.rel, reading.digest)
    _seal(final, tmp)
    return replace(job, content_hash=reading.digest, fragment=str(final), cached=False)


def _verified_or_read(job: FileJob) -> FileJob:
    if not job.cached:
        return _read_into_fragment(job)
    problem = fragment_problem(Path(job.fragment))
    return job if problem is None else replace(_read_into_fragment(job), rebuilt=problem)


def ingest_part(jobs: list[FileJob]) -> list[FileJob]:
    """Verify the cached fragments of one part (reading again those that fail) and read the others into
    fragments; return the jobs as done, in order, each with its fragment's batch layout (``FileJob.batches``).

    With the fragment cache on an object store (a remote root) the part works in a scratch folder of its own: it
    downloads a cached fragment to check its seal, and uploads a new fragment (then its seal) into the cache.
    """
    if not jobs or not is_remote(jobs[0].cache):
        return [_with_layout(done, Path(done.fragment)) for done in map(_verified_or_read, jobs)]
    with tempfile.TemporaryDirectory(prefix="ingest-part-") as scratch:
        return [_verified_or_read_remote(job, Path(scratch)) for job in jobs]


def _verified_or_read_remote(job: FileJob, scratch: Path) -> FileJob:
    problem = None
    if job.cached:
        local = scratch / "cached" / job.fragment.rsplit("/", 1)[1]
        fs, key = object_fs(job.fragment)
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            fs.get([key, key.removesuffix(".arrow") + ".seal"], [str(local), str(_seal_path(local))])
            problem = fragment_problem(local)
        except FileNotFoundError:
            problem = "no longer in the cache"
        if problem is None:
            done = _with_layout(job, local)
            _remove_fragment(local)
            return done
        _remove_fragment(local)
    done = _read_into_fragment(replace(job, cache=str(scratch)))
    local = Path(done.fragment)
    if done.scratch:  # not a cache entry: handed to the merge under the attempt's .parts/, deleted with it
        where = job.scratch_to
        put_files(local.parent, where, [local.name])
    else:
        where = f"{job.cache}/fragments"
        put_files(local.parent, where, [local.name])  # the fragment, then its seal: a seal names a whole fragment
        put_files(local.parent, where, [_seal_path(local).name])
    done = _with_layout(replace(done, cache=job.cache, fragment=f"{where}/{local.name}"), local)
    _remove_fragment(local)
    return replace(done, rebuilt=problem) if problem else done


def _remove_fragment(local: Path) -> None:
    local.unlink(missing_ok=True)
    _seal_path(local).unlink(missing_ok=True)


# --- 3. merge: the flow process writes the ledger; the docs shards are planned, then written by parts ------------


def _kept_docs(batch: pa.RecordBatch, source: str, ordinal: int) -> pa.RecordBatch:
    """The documents of one fragment batch that go to ``docs/``: kept rows, ordinals offset to the file's place."""
    names = pa.array([source] * batch.num_rows, pa.string())
    ordinals = pc.add(batch.column("ordinal"), pa.scalar(ordinal, pa.int64()))
    rows = batch.set_column(batch.schema.get_field_index("ordinal"), "ordinal", ordinals)
    rows = rows.append_column("source", names).filter(pc.is_null(batch.column("reason")))
    return rows.select(DOC_SCHEMA.names)


def _with_layout(job: FileJob, local: Path) -> FileJob:
    """``job`` with its fragment's batch layout: per batch, records, kept documents and their Arrow bytes (what
    the docs writer's row groups are cut by), computed where the fragment is at hand (in the part)."""
    layout = []
    with pa.OSFile(str(local)) as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            kept = _kept_docs(batch, job.source.name, 0)
            layout.append((batch.num_rows, kept.num_rows, kept.nbytes))
    return replace(job, batches=tuple(layout))


class RepeatedIds:
    """Keeps ``id_field`` ids unique: a record whose id repeats an earlier record's (same source, any file) gets
    an id of its own, derived from the first's id and its occurrence number, so two documents are never merged
    under one id. Deterministic (files and records merge in a fixed order); holds every id of the sources
    that name an ``id_field`` in memory."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}
        self.repeats: Counter[str] = Counter()

    def apply(self, source: SourceConfig, batch: pa.RecordBatch) -> pa.RecordBatch:
        if source.id_field is None:
            return batch
        ids = batch.column("doc_id").to_pylist()
        repeated = 0
        for i, doc_id in enumerate(ids):
            n = self.seen.get(doc_id, 0)
            self.seen[doc_id] = n + 1
            if n:
                ids[i] = f"{source.name}:{stable_id(doc_id, 'repeat', str(n))}"
                repeated += 1
        if not repeated:
            return batch
        self.repeats[source.name] += repeated
        return batch.set_column(batch.schema.get_field_index("doc_id"), "doc_id", pa.array(ids, pa.string()))


@dataclass(frozen=True)
class KeptBatch:
    """One fragment batch with kept documents: where it is, its source and ordinal offset, and the batch's
    doc ids when ``RepeatedIds`` renamed some of them."""

    fragment: str
    batch: int
    source: str
    ordinal: int
    ids: tuple[str, ...] | None = None


@dataclass(frozen=True)
class DocsWrite:
    """Rows ``[offset, offset + take)`` of one row-group flush (consecutive kept batches): one write of the docs
    writer, exactly as a single writer streaming every fragment in file order would make it."""

    batches: tuple[KeptBatch, ...]
    offset: int
    take: int


@dataclass(frozen=True)
class DocsShard:
    """Shard ``index`` of ``docs/`` (``SHARD_ROWS`` rows, the last one fewer) and the writes that make it.

    ``out``: the staging folder, or on a remote root the attempt folder the part uploads its shard into."""

    index: int
    writes: tuple[DocsWrite, ...]
    out: str


def plan_docs_shards(kept: list[tuple[KeptBatch, int, int]], out: str) -> list[DocsShard]:
    """Cut the kept batches (each with its kept rows and Arrow bytes, in file order) into the row-group flushes
    and shards a single streaming writer makes: a flush every ``FLUSH_ROWS`` rows or ``FLUSH_BYTES``, a shard
    every ``SHARD_ROWS`` rows, a flush that straddles two shards written in two pieces."""
    flushes: list[tuple[tuple[KeptBatch, ...], int]] = []
    pending: list[KeptBatch] = []
    rows = size = 0
    for batch, n, n_bytes in kept:
        pending.append(batch)
        rows, size = rows + n, size + n_bytes
        if rows >= FLUSH_ROWS or size >= FLUSH_BYTES:
            flushes.append((tuple(pending), rows))
            pending, rows, size = [], 0, 0
    if pending:
        flushes.append((tuple(pending), rows))
    shards = plan_shard_writes(flushes)
    return [DocsShard(i, tuple(DocsWrite(*piece) for piece in pieces), out) for i, pieces in enumerate(shards)]


def write_docs_shard(shard: DocsShard) -> list[FileEntry]:
    """Write one planned docs shard from the fragments (paths or URIs); on a remote root upload it and return its
    entry (size, SHA-256)."""
    with part_folder(shard.out, "ingest-docs-") as folder:
        writer = ParquetShardWriter(folder / "docs", "docs", DOC_SCHEMA, first_shard=shard.index)
        with _FragmentBatches() as fragments:
            for write in shard.writes:
                table = pa.Table.from_batches([fragments.kept(b) for b in write.batches])
                writer.write(table.slice(write.offset, write.take))
        writer.close()
        return upload_part_files(folder, shard.out, files_in(folder, "docs")) if is_remote(shard.out) else []


class _FragmentBatches:
    """Reads fragment batches in file order, keeping one fragment open at a time (ranged reads for a URI)."""

    def __init__(self) -> None:
        self._where: str | None = None
        self._source = None
        self._reader = None

    def kept(self, b: KeptBatch) -> pa.RecordBatch:
        if b.fragment != self._where:
            self.close()
            self._where, self._source = b.fragment, _open_fragment(b.fragment)
            self._reader = pa.ipc.open_file(self._source)
        batch = self._reader.get_batch(b.batch)
        if b.ids is not None:
            batch = batch.set_column(batch.schema.get_field_index("doc_id"), "doc_id", pa.array(b.ids, pa.string()))
        return _kept_docs(batch, b.source, b.ordinal)

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
        self._where = self._source = self._reader = None

    def __enter__(self) -> _FragmentBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_fragment(where: str):
    """A fragment opened for random access: a local file (not a memory map: batches outlive it) or an object."""
    return pa.OSFile(where) if not is_remote(where) else open_input(where)


LEDGER_FIELDS = [FRAGMENT_SCHEMA.get_field_index(n) for n in ("doc_id", "locator", "reason", "score", "scores")]


def merge_fragments(
    jobs: list[FileJob],
    problems: list[SourceFile],
    ctx: StageContext,
    sources: Sequence[SourceConfig] = (),
    workers: int | None = 1,
) -> StageResult:
    """Write ``ledger/`` and ``files/files.parquet`` from the fragments' columns other than the text (in file
    order), then ``docs/`` in planned shards written by parts (``write_docs_shard``); return counts.

    The shards, their row groups and their bytes are those one writer streaming every fragment would make, for
    any number of parts. On a remote root (``ctx.attempt_uri``) the parts upload their shards themselves.
    """
    out_dir = ctx.out_dir
    by_name = {s.name: s for s in sources}
    reasons: Counter[str] = Counter()
    per_source: Counter[str] = Counter()
    ledger = LedgerWriter(out_dir / "ledger", "ingest")
    (out_dir / "docs").mkdir(parents=True, exist_ok=True)
    file_rows: list[dict] = []
    kept_batches: list[tuple[KeptBatch, int, int]] = []
    ordinal = 0
    bytes_kept = 0
    kept_total = 0
    unique_ids = RepeatedIds()
    options = pa.ipc.IpcReadOptions(included_fields=LEDGER_FIELDS + [FRAGMENT_SCHEMA.get_field_index("n_bytes")])
    for job in jobs:
        name = job.source.name
        records = kept = 0
        file_reasons: Counter[str] = Counter()
        with _open_fragment(job.fragment) as source:
            reader = pa.ipc.open_file(source, options=options)
            for i in range(reader.num_record_batches):
                read = reader.get_batch(i)
                batch = unique_ids.apply(job.source, read)
                n = batch.num_rows
                n_records, n_kept, n_bytes = job.batches[i]
                assert n == n_records, f"ingest: fragment {job.fragment} changed while merging"
                is_kept = pc.is_null(batch.column("reason"))
                ledger.record_columns(
                    {
                        "doc_id": batch.column("doc_id"),
                        "source": pa.array([name] * n, pa.string()),
                        "locator": batch.column("locator"),
                        "fate": pc.if_else(is_kept, "kept", "dropped"),
                        "reason": batch.column("reason"),
                        "score": batch.column("score"),
                        "scores": batch.column("scores"),
                    }
                )
                if n_kept:
                    ids = None if batch is read else tuple(batch.column("doc_id").to_pylist())
                    kept_batches.append((KeptBatch(job.fragment, i, name, ordinal, ids), n_kept, n_bytes))
                    bytes_kept += pc.sum(batch.column("n_bytes").filter(is_kept)).as_py() or 0
                records += n
                kept += n_kept
                file_reasons.update(r for r in batch.column("reason").to_pylist() if r is not None)
        ordinal += records
        kept_total += kept
        per_source[name] += records
        reasons.update(file_reasons)
        failure = next((r for r in file_reasons if r.startswith(FILE_FAILURES)), None)
        file_rows.append(
            {
                "source": name,
                "rel": job.file.rel,
                "bytes": job.file.size,
                "content_hash": job.content_hash,
                "records": records,
                "kept": kept,
                "error": failure or (None if records else "no_records"),
                "uri": readers.file_uri(job.source, job.file.path),
            }
        )
    file_rows += [
        {
            "source": p.source,
            "rel": p.rel,
            "records": 0,
            "kept": 0,
            "error": p.error,
            "uri": readers.file_uri(by_name[p.source], p.path) if p.source in by_name else p.path,
        }
        for p in problems
    ]
    ledger.close()
    shards = plan_docs_shards(kept_batches, ctx.attempt_uri or str(out_dir))
    for entries in map_parts(write_docs_shard, shards, workers if len(shards) > 1 else 1):
        ctx.uploaded.extend(entries)
    for job in jobs:
        if job.scratch and not is_remote(job.fragment):
            Path(job.fragment).unlink(missing_ok=True)
    (out_dir / "files").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(file_rows, schema=FILES_SCHEMA), out_dir / "files" / "files.parquet")
    assert ledger.rows == ordinal, f"ingest ledger has {ledger.rows} rows for {ordinal} records"
    return StageResult(
        DocCounts(ordinal, kept_total, reasons),
        {
            "per_source": dict(per_source),
            "bytes_kept": bytes_kept,
            "source_errors": dict(Counter(p.error for p in problems if p.error)),
        }
        | ({"repeated_ids": dict(unique_ids.repeats)} if unique_ids.repeats else {}),
    )


# Files per part, whatever their size: 100M one-document files make ≈25k parts, not millions. Each file has
# its own fragment, merged in file order, so the grouping never changes the artifact.
MAX_FILES_PER_PART = 4096
FILE_FAILURES = ("unreadable", "truncated", "corrupt", "reader_error")  # reasons that end a file's records


def _settle_states(plan: IngestPlan, done: list[FileJob]) -> None:
    """Forget the recorded hash of files whose read did not give the planned content (rewritten while being
    read, or interrupted), so the next run hashes them again; then save every source's state."""
    for planned, job in zip(plan.jobs, done, strict=True):
        if job.content_hash != planned.content_hash:
            plan.states[job.source.name][1].pop(job.file.rel, None)
    for state, seen in plan.states.values():
        state.save(seen)


def ingest(
    sources: list[SourceConfig],
    ctx: StageContext,
    cache_dir: Path | None = None,
    workers: int | None = None,
    part_bytes: int = 64 * 2**20,
    parallel_min_bytes: int = 4 * 2**20,
    fragments: str | None = None,
) -> StageResult:
    """Read every source into ``docs/docs-*.parquet`` and ``ledger/ledger-*.parquet`` under ``ctx.out_dir``.

    ``cache_dir`` keeps per-file fragments and the per-source state across runs (incremental refresh);
    without it fragments go to the stage's work folder and nothing is reused. ``fragments``: keep the fragments
    under this prefix of an object-store root instead, where workers that share nothing with this machine read
    and write them; the docs shards are then uploaded into ``ctx.attempt_uri`` by the parts that write them.
    """
    cache = cache_dir or ctx.work_dir / "cache"
    _remove_stale_temporaries(cache)
    plan = plan_ingest(sources, cache, fragments)
    remote = fragments is not None and is_remote(fragments)
    if remote:
        plan.jobs = [replace(j, scratch_to=f"{ctx.attempt_uri}/{PARTS_PREFIX}/ingest") for j in plan.jobs]
    for note in plan.notes:
        ctx.log(note)
    n_todo = sum(not j.cached for j in plan.jobs)
    n_workers = default_workers(workers)
    total = sum(j.file.size or 0 for j in plan.jobs if not j.cached)
    target = max(1 << 20, min(part_bytes, total // (4 * n_workers) + 1))
    sizes = [j.file.size or 0 for j in plan.jobs]  # cached fragments are verified in the parts too
    parts = [[plan.jobs[i] for i in group] for group in balanced_groups(sizes, target, MAX_FILES_PER_PART)]
    ctx.log(
        f"ingest: {len(plan.jobs)} files ({dict(plan.status)}), reading {n_todo} ({total / 2**20:.1f} MiB) and "
        f"verifying {len(plan.jobs) - n_todo} cached in {len(parts)} parts on {min(n_workers, max(len(parts), 1))} "
        "workers"
    )
    parallel = n_workers if sum(sizes) >= parallel_min_bytes else 1
    done = [job for part in map_parts(ingest_part, parts, parallel, ctx.parts_done) for job in part]
    merged = merge_fragments(done, plan.problems, ctx, sources, parallel)
    if remote:
        remove_prefix(f"{ctx.attempt_uri}/{PARTS_PREFIX}")
    _settle_states(plan, done)
    files = dict(plan.status) | {"read": n_todo, "reused": len(plan.jobs) - n_todo}
    rebuilt = [j for j in done if j.rebuilt]
    changed = [
        j
        for p, j in zip(plan.jobs, done, strict=True)
        if p.content_hash and j.content_hash not in (None, p.content_hash)
    ]
    for job in rebuilt:
        ctx.log(f"ingest: cached fragment of {job.source.name}:{job.file.rel} not trusted ({job.rebuilt}): read again")
    for job in changed:
        ctx.log(f"ingest: {job.source.name}:{job.file.rel} changed while being read: its new content is used")
    if rebuilt:
        files["rebuilt"] = len(rebuilt)
    if changed:
        files["changed_while_reading"] = len(changed)
    extra = dict(merged.extra) | {"files": files, "removed_files": plan.removed[:1000]}
    for name, n in extra["per_source"].items():
        ctx.log(f"ingest: source {name!r}: {n} records")
    for name, n in extra.get("repeated_ids", {}).items():
        ctx.log(
            f"ingest: source {name!r}: {n} records repeat an earlier record's id_field value; each got an id of "
            "its own (counts: repeated_ids)"
        )
    return StageResult(merged.docs, extra)
