"""Source readers: list a source's files through fsspec and stream each file's records in bounded memory.

Every record a file holds comes out as one ``Record``: a text, or ``text=None`` with the reason it could not
be read (binary file, invalid UTF-8, oversized, malformed JSON line, missing text field, truncated or
unreadable file). Problems that are not documents (an unreadable folder, a skipped symlinked folder, a name
that is not valid UTF-8 and whose escaped form collides with another name) come out of ``list_files`` as
``SourceFile`` entries with an ``error``. Nothing here raises for bad input.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import fsspec
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from tasks.config import SourceConfig
from tasks.data.streams import READ_CHUNK, decompressed, failure_reason, open_hashed, printable_name

BINARY_SNIFF_BYTES = 8192
SKIPPED_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn"})


@dataclass(frozen=True)
class SourceFile:
    """A file of a source: ``path`` as its filesystem names it (what is opened), ``rel`` relative to the source
    root in printable form (what locators, ids and lineage record; see ``streams.printable_name``)."""

    source: str
    path: str
    rel: str
    size: int | None = None
    mtime: str | None = None
    error: str | None = None  # set for listing problems: the entry is recorded, not read


@dataclass
class Record:
    """One document found in a file, or the reason it could not be read."""

    locator: str
    text: str | None
    reason: str | None = None
    key: str | None = None  # the record's own id (id_field), when the source has one
    metadata: str | None = None
    scores: dict[str, float] = field(default_factory=dict)


def source_filesystem(source: SourceConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(source.resolved_path(), **source.storage_options)


def file_uri(source: SourceConfig, path: str) -> str:
    """The URI a listed file is read from, for lineage: ``s3://bucket/key``; local files keep their path."""
    root = source.resolved_path()
    protocol = root.split("://", 1)[0] if "://" in root else "file"
    if protocol == "file" or "://" in path:
        return printable_name(path)
    return f"{protocol}://{path}"


def file_kind(rel: str, configured: str) -> str:
    if configured != "auto":
        return configured
    name = rel.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson", ".ndjson.gz", ".ndjson.zst")):
        return "jsonl"
    return "parquet" if name.endswith(".parquet") else "text"


def _excluded(rel: str, patterns: list[str]) -> bool:
    rel = rel.removeprefix("./")
    return any(fnmatch.fnmatch(rel, p) for p in patterns)


def _wanted(rel: str, source: SourceConfig) -> bool:
    return rel.lower().endswith(tuple(source.include_ext)) and not _excluded(rel, source.exclude)


def _walk_local(source: SourceConfig, root: str) -> Iterator[SourceFile]:
    """Depth-first walk in sorted order without recursion (deep trees), never following symlinked folders."""
    stack: list[tuple[str, str]] = [(root, "")]
    while stack:
        folder, rel_dir = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            yield SourceFile(source.name, folder, rel_dir or ".", error=f"unreadable_dir:{type(err).__name__}")
            continue
        subdirs: list[tuple[str, str]] = []
        valid_names = {e.name for e in entries if printable_name(e.name) == e.name}
        for entry in entries:
            name = printable_name(entry.name)
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if name != entry.name and name in valid_names:  # the escaped form is also a real name: keep that one
                yield SourceFile(source.name, entry.path, rel, error="undecodable_name_collision")
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
                is_link = entry.is_symlink()
                link_to_dir = is_link and entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir, is_link, link_to_dir = False, True, False
            if is_dir or link_to_dir:
                if entry.name in SKIPPED_DIRS or _excluded(rel + "/", source.exclude):
                    continue
                if link_to_dir:
                    yield SourceFile(source.name, entry.path, rel, error="symlinked_dir_skipped")
                else:
                    subdirs.append((entry.path, rel))
                continue
            if not _wanted(rel, source):
                continue
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError:  # dangling link or symlink loop: the reader records why it cannot open it
                yield SourceFile(source.name, entry.path, rel)
                continue
            if not stat.S_ISREG(st.st_mode):
                yield SourceFile(source.name, entry.path, rel, error="not_a_regular_file")
                continue
            yield SourceFile(source.name, entry.path, rel, st.st_size, str(st.st_mtime_ns))
        stack.extend(reversed(subdirs))


def _mtime(info: dict) -> str | None:
    for key in ("mtime", "LastModified", "last_modified", "created", "ETag", "etag"):
        if info.get(key) is not None:
            return str(info[key])
    return None


def list_files(source: SourceConfig) -> list[SourceFile]:
    """The source's files in a stable (sorted, depth-first) order, plus entries for listing problems."""
    fs, root = source_filesystem(source)
    if not fs.exists(root):
        raise FileNotFoundError(f"source {source.name!r}: {source.resolved_path()} does not exist")
    if fs.isfile(root):
        info = fs.info(root)
        name = root.rstrip("/").rsplit("/", 1)[-1]
        files = [SourceFile(source.name, root, name, info.get("size"), _mtime(info))]
    elif isinstance(fs, LocalFileSystem):
        files = list(_walk_local(source, root))
    else:
        base = root.rstrip("/") + "/"
        files = []
        for path, info in sorted(fs.find(root, withdirs=False, detail=True).items()):
            rel = path[len(base) :] if path.startswith(base) else path
            if _wanted(rel, source) and not any(part in SKIPPED_DIRS for part in rel.split("/")[:-1]):
                files.append(SourceFile(source.name, path, rel, info.get("size"), _mtime(info)))
    if source.max_files:
        readable = [f for f in files if f.error is None][: source.max_files]
        files = readable + [f for f in files if f.error is not None]
    return files


def has_files(source: SourceConfig) -> bool:
    """Whether the source lists at least one file to read; stops at the first one in a local folder."""
    fs, root = source_filesystem(source)
    if not fs.exists(root):
        return False
    local_folder = isinstance(fs, LocalFileSystem) and not fs.isfile(root)
    return any(f.error is None for f in (_walk_local(source, root) if local_folder else list_files(source)))


# --- decoding ----------------------------------------------------------------------------------------------


def decode_utf8(data: bytes, source: SourceConfig) -> tuple[str | None, int]:
    """Decode UTF-8; on invalid bytes drop (None) or replace with U+FFFD, returning how many were replaced."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        if source.on_invalid_utf8 == "drop":
            return None, 0
        text = data.decode("utf-8", "replace")
        return text, max(1, text.count("\ufffd") - data.count("\ufffd".encode()))


def split_text(text: str, source: SourceConfig) -> list[str]:
    """Documents of a text file: the whole file, its blank-line-separated paragraphs, or parts between matches."""
    if source.split == "file":
        return [text]
    pattern = r"\n[ \t\r\f\v]*\n" if source.split == "paragraph" else source.split_pattern
    return [part for part in re.split(pattern or "", text) if part.strip()] or [text]


# --- readers per format --------------------------------------------------------------------------------
# Each reads the open stream of one file. An exception while turning one record into a ``Record`` costs that
# record (``record_error:<Type>``); an exception of the stream itself (I/O error, truncation, corruption) ends
# the file with one row for its rest, located after the last good record.


def _record_error(locator: str, err: Exception) -> Record:
    return Record(locator, None, f"record_error:{type(err).__name__}")


def read_text_file(fh: BinaryIO, f: SourceFile, source: SourceConfig) -> Iterator[Record]:
    try:
        data = fh.read(source.max_file_bytes + 1)
    except OSError as err:
        yield Record(f.rel, None, failure_reason(err))
        return
    if len(data) > source.max_file_bytes:
        size = float(f.size) if f.size is not None and f.size > len(data) else float(len(data))
        yield Record(f.rel, None, "too_large_file", scores={"bytes": size})
        return
    if b"\x00" in data[:BINARY_SNIFF_BYTES]:
        yield Record(f.rel, None, "binary")
        return
    text, replaced = decode_utf8(data, source)
    if text is None:
        yield Record(f.rel, None, "invalid_utf8")
        return
    scores = {"utf8_replacements": float(replaced)} if replaced else {}
    parts = split_text(text, source)
    if len(parts) == 1:
        yield Record(f.rel, parts[0], scores=scores)
        return
    for i, part in enumerate(parts, start=1):
        yield Record(f"{f.rel}#{i}", part, scores=scores)


def _bounded_lines(fh: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, line or None when longer than ``limit``, its length); memory stays below ~limit bytes."""
    line_no = 0
    while raw := fh.readline(limit + 1):
        line_no += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            length = len(raw)
            while True:  # skip the rest of the line a chunk at a time
                chunk = fh.readline(READ_CHUNK)
                length += len(chunk)
                if not chunk or chunk.endswith(b"\n"):
                    break
            yield line_no, None, length
        else:
            yield line_no, raw, len(raw)


def _metadata_json(values: dict) -> str | None:
    """Metadata as sorted JSON; ``None`` when it cannot be serialized (orjson's depth limit is 254 levels)."""
    try:
        return orjson.dumps(values, option=orjson.OPT_SORT_KEYS, default=str).decode()
    except orjson.JSONEncodeError:
        return None


def _record_from_object(locator: str, obj: object, source: SourceConfig, scores: dict[str, float]) -> Record:
    if not isinstance(obj, dict):
        return Record(locator, None, "missing_text_field")
    text = obj.get(source.text_field)
    if not isinstance(text, str):
        return Record(locator, None, "missing_text_field")
    key = obj.get(source.id_field) if source.id_field else None
    metadata = None
    if source.keep_metadata and len(obj) > 1:
        metadata = _metadata_json({k: v for k, v in obj.items() if k != source.text_field})
        if metadata is None:
            return Record(locator, None, "unserializable_metadata")
    return Record(locator, text, key=None if key is None else str(key), metadata=metadata, scores=scores)


def _jsonl_record(locator: str, line: bytes, source: SourceConfig) -> Record | None:
    """The record of one JSONL line (``None`` for a blank line)."""
    if not line.strip():
        return None
    scores: dict[str, float] = {}
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        text, replaced = decode_utf8(line, source)
        if text is None or replaced == 0:  # invalid UTF-8 to drop, or valid UTF-8 but not JSON
            return Record(locator, None, "invalid_utf8" if text is None else "malformed_json")
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError:
            return Record(locator, None, "malformed_json")
        scores = {"utf8_replacements": float(replaced)}
    return _record_from_object(locator, obj, source, scores)


def read_jsonl_file(fh: BinaryIO, f: SourceFile, source: SourceConfig) -> Iterator[Record]:
    line_no = 0
    stream = fh
    try:
        stream = decompressed(fh, f.rel)
        for line_no, line, length in _bounded_lines(stream, source.max_record_bytes):  # noqa: B007 - used below
            locator = f"{f.rel}:{line_no}"
            if line is None:
                yield Record(locator, None, "too_large_record", scores={"bytes": float(length)})
                continue
            try:
                record = _jsonl_record(locator, line, source)
            except Exception as err:  # noqa: BLE001 - one bad record costs one record
                record = _record_error(locator, err)
            if record is not None:
                yield record
    except Exception as err:  # noqa: BLE001 - the stream failed: truncated, corrupt or unreadable
        yield Record(f"{f.rel}:{line_no + 1}-", None, failure_reason(err))
    finally:
        if stream is not fh:
            stream.close()  # the decompressor only; the file is closed by its opener


class _Unconvertible:
    """A value Arrow could not turn into Python (e.g. invalid UTF-8 in a string column)."""

    def __init__(self, err: Exception):
        self.err = err


def _column_values(column: pa.Array) -> list:
    """``column.to_pylist()``, with rows that fail to convert as ``_Unconvertible`` instead of failing the batch."""
    try:
        return column.to_pylist()
    except Exception:  # noqa: BLE001 - find the bad rows
        out: list = []
        for i in range(len(column)):
            try:
                out.append(column[i].as_py())
            except Exception as err:  # noqa: BLE001
                out.append(_Unconvertible(err))
        return out


def _text_values(column: pa.Array, source: SourceConfig) -> list[tuple[str | None, int] | None]:
    """Per row: ``None`` (null, or not a string column), else ``decode_utf8`` of its bytes (``on_invalid_utf8``)."""
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    kind = column.type
    binary = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary(), pa.string_view(): pa.binary_view()}
    if kind not in binary:
        return [None] * len(column)
    return [None if raw is None else decode_utf8(raw, source) for raw in column.cast(binary[kind]).to_pylist()]


def _parquet_record(
    locator: str, text: tuple[str | None, int] | None, key: object, meta: object, source: SourceConfig
) -> Record:
    if text is None:
        return Record(locator, None, "missing_text_field")
    value, replaced = text
    if value is None:
        return Record(locator, None, "invalid_utf8")
    for item in (key, meta):
        if isinstance(item, _Unconvertible):
            raise item.err
    metadata = None
    if meta is not None:
        metadata = _metadata_json(meta)  # type: ignore[arg-type]
        if metadata is None:
            return Record(locator, None, "unserializable_metadata")
    scores = {"utf8_replacements": float(replaced)} if replaced else {}
    return Record(locator, value, key=None if key is None else str(key), metadata=metadata, scores=scores)


def read_parquet_file(fh: BinaryIO, f: SourceFile, source: SourceConfig) -> Iterator[Record]:
    row = 0
    try:
        pf = pq.ParquetFile(fh)
        names = pf.schema_arrow.names
        extra = [n for n in names if n not in (source.text_field, source.id_field)]
        for batch in pf.iter_batches(batch_size=1024):
            n = batch.num_rows
            texts = _text_values(batch.column(source.text_field), source) if source.text_field in names else None
            keys = _column_values(batch.column(source.id_field)) if source.id_field in names else [None] * n
            metas = _column_values(batch.select(extra).to_struct_array()) if source.keep_metadata and extra else None
            for i in range(n):
                row += 1
                locator = f"{f.rel}:{row}"
                try:
                    if texts is None:
                        record = Record(locator, None, "missing_text_field")
                    else:
                        record = _parquet_record(locator, texts[i], keys[i], metas[i] if metas else None, source)
                except Exception as err:  # noqa: BLE001 - one bad row costs one row
                    record = _record_error(locator, err)
                yield record
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types for corrupt files; record, don't crash
        yield Record(f"{f.rel}:{row + 1}-", None, failure_reason(err))


READERS = {"text": read_text_file, "jsonl": read_jsonl_file, "parquet": read_parquet_file}


class FileReading:
    """The records of one file (iterate once); afterwards ``digest`` is the hash of the bytes they came from.

    ``digest`` is ``None`` when the file could not be opened or an I/O error interrupted it: such a result
    depends on the moment, not on the content, and must not be cached. A reader bug becomes a recorded reason
    for the rest of the file, not a crash.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, f: SourceFile, source: SourceConfig):
        self.fs, self.file, self.source = fs, f, source
        self.digest: str | None = None

    def __iter__(self) -> Iterator[Record]:
        rel, kind = self.file.rel, file_kind(self.file.rel, self.source.kind)
        try:
            fh, hashed = open_hashed(self.fs, self.file.path)
        except OSError as err:
            yield Record(rel if kind == "text" else f"{rel}:1-", None, failure_reason(err))
            return
        with fh:
            n = 0
            try:
                for record in READERS[kind](fh, self.file, self.source):
                    n += 1
                    yield record
            except Exception as err:  # noqa: BLE001 - the stage must account for every input even on a reader bug
                yield Record(f"{rel}:{n + 1}-", None, f"reader_error:{type(err).__name__}")
            self.digest = hashed.digest()


def read_file(fs: fsspec.AbstractFileSystem, f: SourceFile, source: SourceConfig) -> Iterator[Record]:
    """Every record of one file (see ``FileReading`` for the hash of what was read)."""
    return iter(FileReading(fs, f, source))
