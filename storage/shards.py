"""Parquet document shards and Arrow IPC token shards, read and written in bounded-memory record batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DOC_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("locator", pa.string()),
        ("ordinal", pa.int64()),
        ("text", pa.large_string()),
        ("n_bytes", pa.int64()),
        ("metadata", pa.string()),  # JSON object of the record's other fields/columns, or null
    ]
)

LEDGER_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("stage", pa.string()),
        ("source", pa.string()),
        ("locator", pa.string()),
        ("content_hash", pa.string()),
        ("fate", pa.string()),  # kept | dropped | duplicate
        ("reason", pa.string()),
        ("score", pa.float64()),
        ("duplicate_of", pa.string()),
        ("similarity", pa.float64()),
        ("split", pa.string()),
        ("shard", pa.string()),
        ("token_start", pa.int64()),
        ("token_end", pa.int64()),
        ("scores", pa.map_(pa.string(), pa.float64())),  # every filter statistic, so thresholds can be re-tuned
        ("cluster_id", pa.string()),  # dedup: the doc_id of the document's near-duplicate cluster representative
    ]
)


SHARD_ROWS = 50_000
T = TypeVar("T")


class ParquetShardWriter:
    """Writes rows into ``<folder>/<prefix>-00000.parquet``, ``-00001`` … rolling over every ``rows_per_shard``.

    Files are written with fixed settings (zstd, no statistics drift) so identical rows give identical bytes.
    ``first_shard`` numbers the first file (a part writing shard k of a stage's planned layout).
    """

    def __init__(
        self, folder: Path, prefix: str, schema: pa.Schema, rows_per_shard: int = SHARD_ROWS, first_shard: int = 0
    ):
        self.folder = folder
        self.prefix = prefix
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.first_shard = first_shard
        self.paths: list[Path] = []
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_shard = 0
        folder.mkdir(parents=True, exist_ok=True)

    def _open(self) -> pq.ParquetWriter:
        path = self.folder / f"{self.prefix}-{self.first_shard + len(self.paths):05d}.parquet"
        self.paths.append(path)
        self._rows_in_shard = 0
        return pq.ParquetWriter(path, self.schema, compression="zstd", write_statistics=True)

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        table = table.select(self.schema.names).cast(self.schema)
        offset = 0
        while offset < table.num_rows:
            if self._writer is None or self._rows_in_shard >= self.rows_per_shard:
                self.close_shard()
                self._writer = self._open()
            take = min(self.rows_per_shard - self._rows_in_shard, table.num_rows - offset)
            self._writer.write_table(table.slice(offset, take))
            self._rows_in_shard += take
            self.rows += take
            offset += take

    def write_rows(self, rows: list[dict]) -> None:
        if rows:
            self.write(pa.Table.from_pylist(rows, schema=self.schema))

    def close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> list[Path]:
        self.close_shard()
        return self.paths

    def __enter__(self) -> ParquetShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plan_shard_writes(
    writes: Iterable[tuple[T, int]], rows_per_shard: int = SHARD_ROWS
) -> list[list[tuple[T, int, int]]]:
    """Where a ``ParquetShardWriter`` puts a sequence of writes of ``(item, rows)``: per shard, in order, the
    pieces ``(item, offset, take)`` it writes (a write that straddles two shards is written in two pieces). Lets
    parts write the shards of one writer's layout, each its own."""
    shards: list[list[tuple[T, int, int]]] = []
    written = 0
    for item, rows in writes:
        offset = 0
        while offset < rows:
            shard, in_shard = divmod(written, rows_per_shard)
            take = min(rows_per_shard - in_shard, rows - offset)
            if shard == len(shards):
                shards.append([])
            shards[shard].append((item, offset, take))
            offset, written = offset + take, written + take
    return shards


def iter_batches(
    paths: Iterable[Path], columns: list[str] | None = None, batch_size: int = 2048
) -> Iterator[pa.RecordBatch]:
    """Stream record batches from Parquet files in order; memory is bounded by ``batch_size`` rows."""
    for path in paths:
        pf = pq.ParquetFile(path)
        yield from pf.iter_batches(batch_size=batch_size, columns=columns)


class LedgerWriter(ParquetShardWriter):
    """The per-document fate ledger of one stage: rows with defaults for the columns a stage does not fill.

    Stages (and their parallel parts) write unsorted ``ledger/ledger-*.parquet`` files; when the stage ends,
    ``storage.ledger.compact_ledger_folder`` sorts them into range-partitioned parts with an index.
    """

    def __init__(self, folder: Path, stage: str, prefix: str = "ledger"):
        super().__init__(folder, prefix, LEDGER_SCHEMA, rows_per_shard=1_000_000)
        self.stage = stage

    def record(self, rows: list[dict]) -> None:
        self.write_rows([{name: row.get(name) for name in LEDGER_SCHEMA.names} | {"stage": self.stage} for row in rows])

    def record_columns(self, columns: dict[str, pa.Array]) -> None:
        """Record rows given column-wise (Arrow arrays of equal length); absent columns are null."""
        n = len(next(iter(columns.values())))
        arrays = [
            pa.array([self.stage] * n, pa.string()) if f.name == "stage" else columns.get(f.name, pa.nulls(n, f.type))
            for f in LEDGER_SCHEMA
        ]
        self.write(pa.Table.from_arrays(arrays, schema=LEDGER_SCHEMA) if n else LEDGER_SCHEMA.empty_table())


# --- token shards: one flat token column in an uncompressed Arrow IPC file, memory-mappable -------------

TOKEN_COLUMN = "tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_token_shard(path: Path, tokens: np.ndarray) -> None:
    """Write a flat token array as a single-column Arrow IPC file (uncompressed, so it maps zero-copy)."""
    arr = pa.array(tokens)
    table = pa.table({TOKEN_COLUMN: arr})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1 << 22)


def read_token_shard(path: Path) -> np.ndarray:
    """Memory-map a token shard and return it as one NumPy array (zero-copy when it has a single chunk)."""
    source = pa.memory_map(str(path), "r")
    table = pa.ipc.open_file(source).read_all()
    column = table.column(TOKEN_COLUMN)
    if column.num_chunks == 1:
        return column.chunk(0).to_numpy(zero_copy_only=True)
    return np.concatenate([chunk.to_numpy(zero_copy_only=True) for chunk in column.chunks])
