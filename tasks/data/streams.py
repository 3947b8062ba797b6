"""Byte streams of source files: opened once, hashed as they are read, decompressed with damage kept local.

``HashedInput`` hashes exactly the bytes a reader consumes (and, when the reader stopped early or jumped around,
the rest of the same open file), so a cached result can be keyed by what was read rather than by what was
listed a moment earlier. ``decompressed`` returns gzip / zstd streams whose records before a damaged or
trailing region come out before the error is raised. ``printable_name`` gives file names that are not valid
UTF-8 a reversible, printable form.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from typing import BinaryIO

import fsspec
import xxhash
from fsspec.implementations.local import LocalFileSystem

READ_CHUNK = 1 << 20
ZSTD_SLICE = 1 << 17  # compressed bytes per decompress call: damage costs at most about one zstd block


class HashedInput(io.RawIOBase):
    """A raw binary stream over ``inner`` that hashes (xxh3-128, as ``storage.hashing.stream_hash``) what it reads.

    Reads that continue from the end of the hashed prefix extend the hash; ``digest`` hashes the rest of the
    file from the same handle. An ``OSError`` from the underlying file makes the digest ``None``: what was read
    is then not a function of the file's content, and must not be cached under it.
    """

    def __init__(self, inner: BinaryIO):
        self._inner = inner
        self._hash = xxhash.xxh3_128()
        self._hashed = 0  # bytes [0, _hashed) are in the hash
        self._pos = 0
        self.io_failed = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._inner.seekable()

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = self._guarded(self._inner.seek, offset, whence)
        return self._pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = self._guarded(self._inner.readinto, buffer) or 0
        if self._pos == self._hashed:
            self._hash.update(memoryview(buffer)[:n])
            self._hashed += n
        self._pos += n
        return n

    def _guarded(self, fn, *args):
        try:
            return fn(*args)
        except OSError:
            self.io_failed = True
            raise

    def digest(self) -> str | None:
        """The hash of the whole file as this handle sees it, or ``None`` after an I/O error."""
        if self.io_failed:
            return None
        try:
            if self._pos != self._hashed:
                self._inner.seek(self._hashed)
            while chunk := self._inner.read(READ_CHUNK):
                self._hash.update(chunk)
                self._hashed += len(chunk)
        except OSError:
            return None
        self._pos = self._hashed
        return self._hash.hexdigest()

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            super().close()


def open_hashed(fs: fsspec.AbstractFileSystem, path: str) -> tuple[BinaryIO, HashedInput]:
    """A buffered reader over ``path`` and the ``HashedInput`` beneath it (closed with the reader)."""
    if isinstance(fs, LocalFileSystem):
        inner = open(path, "rb", buffering=0)  # noqa: SIM115 - closed with the reader
    else:
        inner = fs.open(path, "rb", block_size=READ_CHUNK)
    hashed = HashedInput(inner)
    return io.BufferedReader(hashed, READ_CHUNK), hashed  # type: ignore[return-value]


class _ZstdReader(io.RawIOBase):
    """Streaming zstd decompression (concatenated frames too) that keeps the output before damage.

    A truncated frame raises ``EOFError`` at the end (zstandard's own reader does not). Corrupt or trailing bytes
    raise ``zstandard.ZstdError`` only after everything decoded before them has been returned.
    """

    def __init__(self, raw: BinaryIO):
        import zstandard

        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._errors = zstandard.ZstdError
        self._error: Exception | None = None
        self._pending = b""
        self._fed = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            if self._error is not None:
                raise self._error
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
        for start in range(0, len(chunk), ZSTD_SLICE):
            piece = chunk[start : start + ZSTD_SLICE]
            try:
                while piece:
                    if self._obj.eof:  # the next frame (or trailing bytes, which fail to decode)
                        self._obj = self._dctx.decompressobj()
                    self._fed = True
                    out.append(self._obj.decompress(piece))
                    piece = self._obj.unused_data if self._obj.eof else b""
            except self._errors as err:
                self._error = err  # raised once the output decoded so far has been read
                break
        return b"".join(out)


def decompressed(raw: BinaryIO, rel: str) -> BinaryIO:
    """``raw`` itself, or a decompressing stream over it chosen by the name's suffix (``.gz``, ``.zst``)."""
    name = rel.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(raw), READ_CHUNK)  # type: ignore[return-value]
    return raw


def failure_reason(err: BaseException) -> str:
    """The drop reason of a file (or its rest) that could not be read: I/O error, truncation or corruption."""
    name = type(err).__name__
    if isinstance(err, EOFError):
        return f"truncated:{name}"
    if isinstance(err, gzip.BadGzipFile | zlib.error) or name == "ZstdError":
        return f"corrupt:{'zlib.error' if isinstance(err, zlib.error) else name}"
    return f"unreadable:{name}"


def printable_name(name: str) -> str:
    """``name`` itself when it is valid UTF-8; else its bytes with ``\\`` doubled and undecodable bytes as ``\\xNN``.

    Names from ``os.scandir`` carry undecodable bytes as lone surrogates, which Arrow, Parquet and DuckDB
    cannot store; the escaped form can (``original_name`` reverses it).
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        raw = os.fsencode(name)
        return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def original_name(printable: str) -> bytes:
    """The bytes of a name escaped by ``printable_name`` (not for names that were valid UTF-8)."""
    out = bytearray()
    data = printable.encode("utf-8")
    i = 0
    while i < len(data):
        if data[i : i + 2] == b"\\\\":
            out += b"\\"
            i += 2
        elif data[i : i + 2] == b"\\x":
            out.append(int(data[i + 2 : i + 4], 16))
            i += 4
        else:
            out.append(data[i])
            i += 1
    return bytes(out)
