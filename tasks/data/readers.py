"""Source readers: list a source's files through fsspec and stream each file's records in bounded memory.

Every record a file holds comes out as one ``Record``: a text, or ``text=None`` with the reason it could not
be read (binary file, invalid UTF-8, oversized, malformed JSON line, missing text field, truncated or
unreadable file). Problems that are not documents (an unreadable folder, a skipped symlinked folder) come out
of ``list_files`` as ``SourceFile`` entries with an ``error``. Nothing here raises for bad input.
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import fsspec
import orjson
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from tasks.config import SourceConfig

BINARY_SNIFF_BYTES = 8192
READ_CHUNK = 1 << 20
SKIPPED_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn"})


@dataclass(frozen=True)
class SourceFile:
    """A file of a source (``path`` as its filesystem names it, ``rel`` relative to the source root)."""

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
        return path
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
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
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


# --- opening and decompressing ------------------------------------------------------------------------------


class _ZstdReader(io.RawIOBase):
    """Streaming zstd decompression that raises EOFError on a truncated frame (zstandard's reader does not)."""

    def __init__(self, raw: BinaryIO):
        import zstandard

        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._pending = b""
        self._fed = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            chunk = self._raw.read(READ_CHUNK)
            if not chunk:
                if self._fed and not self._obj.eof:
                    raise EOFError("zstd stream ended before the end of its frame")
                return 0
            self._pending = self._feed(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _feed(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            if self._obj.eof:  # concatenated frames
                self._obj = self._dctx.decompressobj()
            self._fed = True
            out.append(self._obj.decompress(chunk))
            chunk = self._obj.unused_data if self._obj.eof else b""
        return b"".join(out)


def open_binary(fs: fsspec.AbstractFileSystem, path: str) -> BinaryIO:
    if isinstance(fs, LocalFileSystem):
        return open(path, "rb", buffering=READ_CHUNK)  # noqa: SIM115 - the caller closes it
    return fs.open(path, "rb", block_size=READ_CHUNK)


def _decompressed(raw: BinaryIO, rel: str) -> BinaryIO:
    name = rel.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(raw), READ_CHUNK)  # type: ignore[return-value]
    return raw


def _failure(err: BaseException) -> str:
    if isinstance(err, EOFError | gzip.BadGzipFile) or type(err).__name__ == "ZstdError":
        return f"truncated:{type(err).__name__}"
    return f"unreadable:{type(err).__name__}"


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


def read_text_file(fs: fsspec.AbstractFileSystem, f: SourceFile, source: SourceConfig) -> Iterator[Record]:
    if f.size is not None and f.size > source.max_file_bytes:
        yield Record(f.rel, None, "too_large_file", scores={"bytes": float(f.size)})
        return
    try:
        with open_binary(fs, f.path) as fh:
            data = fh.read(source.max_file_bytes + 1)
    except OSError as err:
        yield Record(f.rel, None, _failure(err))
        return
    if len(data) > source.max_file_bytes:
        yield Record(f.rel, None, "too_large_file", scores={"bytes": float(len(data))})
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


def _record_from_object(locator: str, obj: object, source: SourceConfig, scores: dict[str, float]) -> Record:
    if not isinstance(obj, dict):
        return Record(locator, None, "missing_text_field")
    text = obj.get(source.text_field)
    if not isinstance(text, str):
        return Record(locator, None, "missing_text_field")
    key = obj.get(source.id_field) if source.id_field else None
    metadata = None
    if source.keep_metadata and len(obj) > 1:
        rest = {k: v for k, v in obj.items() if k != source.text_field}
        metadata = orjson.dumps(rest, option=orjson.OPT_SORT_KEYS).decode()
    return Record(locator, text, key=None if key is None else str(key), metadata=metadata, scores=scores)


def read_jsonl_file(fs: fsspec.AbstractFileSystem, f: SourceFile, source: SourceConfig) -> Iterator[Record]:
    line_no = 0
    try:
        with open_binary(fs, f.path) as raw, _decompressed(raw, f.rel) as fh:
            for line_no, line, length in _bounded_lines(fh, source.max_record_bytes):  # noqa: B007 - used below
                locator = f"{f.rel}:{line_no}"
                if line is None:
                    yield Record(locator, None, "too_large_record", scores={"bytes": float(length)})
                    continue
                if not line.strip():
                    continue
                scores: dict[str, float] = {}
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    text, replaced = decode_utf8(line, source)
                    if text is None or replaced == 0:  # invalid UTF-8 to drop, or valid UTF-8 but not JSON
                        yield Record(locator, None, "invalid_utf8" if text is None else "malformed_json")
                        continue
                    try:
                        obj = orjson.loads(text)
                    except orjson.JSONDecodeError:
                        yield Record(locator, None, "malformed_json")
                        continue
                    scores = {"utf8_replacements": float(replaced)}
                yield _record_from_object(locator, obj, source, scores)
    except (OSError, EOFError, ValueError) as err:
        # The rest of a truncated or unreadable file is one ledger row, located after the last good line.
        yield Record(f"{f.rel}:{line_no + 1}-", None, _failure(err))


def read_parquet_file(fs: fsspec.AbstractFileSystem, f: SourceFile, source: SourceConfig) -> Iterator[Record]:
    row = 0
    try:
        with open_binary(fs, f.path) as fh:
            pf = pq.ParquetFile(fh)
            names = pf.schema_arrow.names
            for batch in pf.iter_batches(batch_size=1024):
                texts = batch.column(source.text_field).to_pylist() if source.text_field in names else None
                keys = batch.column(source.id_field).to_pylist() if source.id_field in names else None
                extra = [n for n in names if n not in (source.text_field, source.id_field)]
                metas = batch.select(extra).to_pylist() if source.keep_metadata and extra else None
                for i in range(batch.num_rows):
                    row += 1
                    locator = f"{f.rel}:{row}"
                    text = texts[i] if texts is not None else None
                    if not isinstance(text, str):
                        yield Record(locator, None, "missing_text_field")
                        continue
                    meta = orjson.dumps(metas[i], option=orjson.OPT_SORT_KEYS, default=str).decode() if metas else None
                    key = keys[i] if keys is not None else None
                    yield Record(locator, text, key=None if key is None else str(key), metadata=meta)
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types for corrupt files; record, don't crash
        yield Record(f"{f.rel}:{row + 1}-", None, _failure(err))


READERS = {"text": read_text_file, "jsonl": read_jsonl_file, "parquet": read_parquet_file}


def read_file(fs: fsspec.AbstractFileSystem, f: SourceFile, source: SourceConfig) -> Iterator[Record]:
    """Every record of one file; a reader bug becomes a recorded reason for the rest of the file, not a crash."""
    n = 0
    try:
        for record in READERS[file_kind(f.rel, source.kind)](fs, f, source):
            n += 1
            yield record
    except Exception as err:  # noqa: BLE001 - the stage must account for every input even on a reader bug
        yield Record(f"{f.rel}:{n + 1}-", None, f"reader_error:{type(err).__name__}")
