"""Pass 5a, the kept documents: one part per output shard copies its rows out of the input shards.

The write pass decides every document's fate in the flow process from the plan and the clusters alone, reading
only the input's id columns; which input rows each output shard holds, and in which writes, follows from the
kept count of every input batch (``plan_shard_writes``: the layout one writer streaming the kept documents in
input order makes). Each ``write_kept_shard`` part reads just those rows (the texts; object URIs on a remote root),
writes its shard and, on a remote root, uploads it into the attempt folder, so the texts never pass through
the flow process and the files are byte for byte those of a single writer.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from storage.artifacts import FileEntry
from storage.part_outputs import files_in, part_folder, upload_part_files
from storage.remote import is_remote, open_input
from storage.shards import ParquetShardWriter, plan_shard_writes
from tasks.data.dedup.schema import DEDUP_SCHEMA


@dataclass(frozen=True)
class KeptRows:
    """The kept rows of one input batch: the input file (path or URI), the batch's first row and row count in
    it, and the kept rows' positions within the batch."""

    source: str
    start: int
    rows: int
    kept: tuple[int, ...]


@dataclass(frozen=True)
class KeptShard:
    """Output shard ``index`` of ``docs/``: pieces ``(batch, offset, take)`` of the kept batches, in order.
    ``out``: the staging folder, or the attempt folder (an object URI) the part uploads into."""

    index: int
    pieces: tuple[tuple[KeptRows, int, int], ...]
    out: str


def plan_kept_shards(batches: list[KeptRows], out: str) -> list[KeptShard]:
    """The shards a single writer makes from the kept batches (one write per input batch with kept rows)."""
    shards = plan_shard_writes((b, len(b.kept)) for b in batches if b.kept)
    return [KeptShard(i, tuple(pieces), out) for i, pieces in enumerate(shards)]


class _Rows:
    """Rows of input files by position, each file opened once in turn (ranged reads of its row groups)."""

    def __init__(self) -> None:
        self.source: str | None = None
        self.file: pq.ParquetFile | None = None
        self.handle = None
        self.starts: list[int] = []

    def read(self, source: str, start: int, rows: int) -> list[dict]:
        if source != self.source:
            self.close()
            self.source, self.handle = source, open_input(source)
            self.file = pq.ParquetFile(self.handle)
            meta = self.file.metadata
            self.starts = [0]
            for g in range(meta.num_row_groups):
                self.starts.append(self.starts[-1] + meta.row_group(g).num_rows)
        groups = [
            g for g in range(len(self.starts) - 1) if self.starts[g] < start + rows and self.starts[g + 1] > start
        ]
        table = self.file.read_row_groups(groups)  # type: ignore[union-attr]
        return table.slice(start - self.starts[groups[0]], rows).to_pylist()

    def close(self) -> None:
        if self.handle is not None and self.handle is not self.source:
            self.handle.close()
        self.source = self.file = self.handle = None


def write_kept_shard(shard: KeptShard) -> list[FileEntry]:
    """Write one output shard from its input rows; on a remote root upload it and return its entry."""
    with part_folder(shard.out, "dedup-docs-") as folder:
        writer = ParquetShardWriter(folder / "docs", "docs", DEDUP_SCHEMA, first_shard=shard.index)
        rows = _Rows()
        try:
            for batch, offset, take in shard.pieces:
                docs = rows.read(batch.source, batch.start, batch.rows)
                kept = [docs[i] | {"split_key": docs[i]["doc_id"]} for i in batch.kept]
                writer.write(pa.Table.from_pylist(kept, schema=DEDUP_SCHEMA).slice(offset, take))
        finally:
            rows.close()
        writer.close()
        return upload_part_files(folder, shard.out, files_in(folder, "docs")) if is_remote(shard.out) else []
