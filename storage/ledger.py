"""The per-document ledger at rest: sorted, range-partitioned Parquet parts and a small index beside them.

A stage (and its parallel parts) writes unsorted ledger fragments; ``compact_ledger_folder`` turns them into

    ledger/ledger-00000.parquet …       rows sorted by (doc_id, stage, locator), at most PART_ROWS rows per file,
                                         ROW_GROUP-row groups
    ledger-index/parts.json             first and last key and row count of every part (ledger and links)
    ledger-index/rollup.parquet         documents (and tokens) per source, stage, fate, reason, split and shard
    ledger-index/links-00000.parquet    (key, link, doc_id) sorted by key: which documents carry a given
                                         content_hash or point at a given duplicate_of (stage-chosen columns)

Why parts and not one file: a point lookup must decode one row group, and the footer of a 10M-row file with
small row groups is megabytes, parsed on every open. Parts of 131k rows keep footers at tens of KB, so
opening the one part whose key range holds a document and decoding one 4k-row group costs milliseconds.
Doc ids start with their source's name, so a source's rows are one contiguous run of parts; the rollup
answers per-source counts without touching the rows at all.

The sort is total and the files are written with fixed settings, so identical rows give identical bytes:
the ledger and its index are part of the artifact's content hash.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.shards import LEDGER_SCHEMA

PART_ROWS = 131_072
ROW_GROUP = 4_096
INDEX_DIR = "ledger-index"
PARTS_FILE = "parts.json"
ROLLUP_FILE = "rollup.parquet"
LINKS_SCHEMA = pa.schema([("key", pa.string()), ("link", pa.string()), ("doc_id", pa.string())])
ROLLUP_SCHEMA = pa.schema(
    [(name, pa.string()) for name in ("source", "stage", "fate", "reason", "split", "shard")]
    + [("docs", pa.int64()), ("tokens", pa.int64())]
)
ROLLUP_SQL = (
    "SELECT source, stage, fate, reason, split, shard, count(*)::BIGINT AS docs, "
    "sum(token_end - token_start)::BIGINT AS tokens FROM read_parquet(?, union_by_name = true) "
    "GROUP BY ALL ORDER BY ALL"
)


def _write_parts(batches: Iterable[pa.RecordBatch], folder: Path, prefix: str, schema: pa.Schema) -> list[dict]:
    """Write sorted batches into ``<prefix>-NNNNN.parquet`` files of PART_ROWS rows; return each part's key range."""
    folder.mkdir(parents=True, exist_ok=True)
    key = schema.names[0]
    parts: list[dict] = []
    pending: list[pa.RecordBatch] = []
    pending_rows = 0

    def flush(table: pa.Table) -> None:
        name = f"{prefix}-{len(parts):05d}.parquet"
        pq.write_table(table, folder / name, row_group_size=ROW_GROUP, compression="zstd", write_statistics=True)
        keys = table.column(key)
        first, last = (keys[0].as_py(), keys[-1].as_py()) if table.num_rows else (None, None)
        parts.append({"file": name, "first": first, "last": last, "rows": table.num_rows})

    for batch in batches:
        pending.append(batch.select(schema.names).cast(schema))
        pending_rows += batch.num_rows
        while pending_rows >= PART_ROWS:
            table = pa.Table.from_batches(pending, schema)
            flush(table.slice(0, PART_ROWS).combine_chunks())
            rest = table.slice(PART_ROWS)
            pending, pending_rows = rest.to_batches(), rest.num_rows
    if pending_rows or not parts:
        flush(pa.Table.from_batches(pending, schema).combine_chunks())
    return parts


def compact_ledger(fragments: list[Path], folder: Path, links: tuple[str, ...] = ()) -> list[Path]:
    """Sort ledger fragments by doc id into parts in ``folder`` and write the index beside it (DuckDB sorts,
    spilling to disk past RAM; batches stream into the Parquet writer, so memory stays bounded).

    ``links`` names the columns (e.g. content_hash, duplicate_of) that get a reverse lookup by value.
    """
    import duckdb

    index = folder.parent / INDEX_DIR
    index.mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in fragments]
    ledger_parts: list[dict] = []
    link_parts: list[dict] = []
    rollup = ROLLUP_SCHEMA.empty_table()
    con = duckdb.connect()
    try:
        if files:
            sorted_rows = con.sql(
                "SELECT * FROM read_parquet(?, union_by_name = true) ORDER BY doc_id, stage, locator", params=[files]
            ).to_arrow_reader(ROW_GROUP * 8)
            ledger_parts = _write_parts(sorted_rows, folder, "ledger", LEDGER_SCHEMA)
            rollup = con.sql(ROLLUP_SQL, params=[files]).to_arrow_table().cast(ROLLUP_SCHEMA)
            if links:
                selects = " UNION ALL ".join(
                    f"SELECT {c} AS key, '{c}' AS link, doc_id FROM read_parquet(?, union_by_name = true) "
                    f"WHERE {c} IS NOT NULL"
                    for c in links
                )
                linked = con.sql(f"{selects} ORDER BY key, link, doc_id", params=[files] * len(links))
                link_parts = _write_parts(linked.to_arrow_reader(ROW_GROUP * 8), index, "links", LINKS_SCHEMA)
        else:
            ledger_parts = _write_parts([], folder, "ledger", LEDGER_SCHEMA)
    finally:
        con.close()
    pq.write_table(rollup, index / ROLLUP_FILE, compression="zstd")
    (index / PARTS_FILE).write_text(json.dumps({"ledger": ledger_parts, "links": link_parts}, indent=1) + "\n")
    return [folder / p["file"] for p in ledger_parts]


def compact_ledger_folder(folder: Path, links: tuple[str, ...] = ()) -> list[Path] | None:
    """Replace a stage's ledger fragment files in ``folder`` by sorted parts and their index."""
    if not folder.is_dir():
        return None
    staging = folder.with_name(f".{folder.name}-fragments")
    os.rename(folder, staging)
    try:
        return compact_ledger(sorted(staging.glob("*.parquet")), folder, links)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class LedgerIndex:
    """Reads one artifact's ledger: rows by doc id, documents by link value, per-source rollup.

    A ledger written before the index existed (no ``ledger-index/parts.json``) still answers every question:
    each of its files is a candidate part, pruned by Parquet row-group statistics only.
    """

    def __init__(self, artifact: Path | str):
        self.artifact = Path(artifact)
        self.folder = self.artifact / "ledger"
        meta_path = self.artifact / INDEX_DIR / PARTS_FILE
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            self.parts = [self.folder / p["file"] for p in meta["ledger"]]
            self._firsts = [p["first"] for p in meta["ledger"]]
            self._lasts = [p["last"] for p in meta["ledger"]]
            self.link_parts = [self.artifact / INDEX_DIR / p["file"] for p in meta["links"]]
            self._link_firsts = [p["first"] for p in meta["links"]]
            self._link_lasts = [p["last"] for p in meta["links"]]
            self.indexed = True
        else:
            self.parts = sorted(self.folder.glob("*.parquet"))
            self._firsts = self._lasts = [None] * len(self.parts)
            self.link_parts, self._link_firsts, self._link_lasts = [], [], []
            self.indexed = False

    @property
    def files(self) -> list[str]:
        return [str(p) for p in self.parts]

    def files_between(self, lo: str, hi: str) -> list[str]:
        """Parts that may hold doc ids in ``[lo, hi)`` (a source's contiguous range)."""
        return [
            str(p)
            for p, first, last in zip(self.parts, self._firsts, self._lasts, strict=True)
            if first is None or (first < hi and last >= lo)
        ]

    def rows(self, doc_ids: Iterable[str], columns: list[str] | None = None) -> list[dict]:
        """The ledger rows of these documents, in ledger order."""
        return _lookup(self.parts, self._firsts, self._lasts, "doc_id", set(doc_ids), columns)

    def linked(self, keys: Iterable[str], link: str) -> list[str]:
        """Doc ids whose ``link`` column (content_hash, duplicate_of) holds any of ``keys``; [] if not indexed."""
        keys = set(keys)
        if not keys:
            return []
        if not self.indexed:  # an older ledger without link index: scan its column
            table = pq.read_table(self.files, columns=["doc_id", link], filters=[(link, "in", sorted(keys))])
            return table.column("doc_id").to_pylist()
        found = _lookup(self.link_parts, self._link_firsts, self._link_lasts, "key", keys, None)
        return [r["doc_id"] for r in found if r["link"] == link]

    def rollup(self) -> pa.Table:
        """Documents and tokens per (source, stage, fate, reason, split, shard)."""
        path = self.artifact / INDEX_DIR / ROLLUP_FILE
        if path.is_file():
            return pq.read_table(path)
        import duckdb

        with duckdb.connect() as con:
            return con.sql(ROLLUP_SQL, params=[self.files]).to_arrow_table().cast(ROLLUP_SCHEMA)


def _candidate_parts(firsts: list, lasts: list, key: str) -> Iterator[int]:
    """Indexes of parts whose [first, last] range may contain ``key`` (all of them when ranges are unknown)."""
    if firsts and firsts[0] is not None:
        i = bisect.bisect_left(lasts, key)  # the first part ending at or after the key; equal keys may span parts
        while i < len(firsts) and firsts[i] <= key:
            yield i
            i += 1
    else:
        yield from range(len(firsts))


def _lookup(
    parts: list[Path], firsts: list, lasts: list, key: str, wanted: set[str], columns: list[str] | None
) -> list[dict]:
    """Rows whose ``key`` column is in ``wanted``: open only candidate parts, decode only row groups whose
    statistics can hold a wanted key."""
    by_part: dict[int, list[str]] = {}
    for value in wanted:
        for i in _candidate_parts(firsts, lasts, value):
            by_part.setdefault(i, []).append(value)
    rows: list[dict] = []
    for i in sorted(by_part):
        keys = sorted(by_part[i])
        pf = pq.ParquetFile(parts[i])
        col = pf.schema_arrow.get_field_index(key)
        groups = []
        for g in range(pf.metadata.num_row_groups):
            stats = pf.metadata.row_group(g).column(col).statistics
            if stats is None or not stats.has_min_max:
                groups.append(g)
                continue
            j = bisect.bisect_left(keys, stats.min)
            if j < len(keys) and keys[j] <= stats.max:
                groups.append(g)
        if not groups:
            continue
        read = None if columns is None else sorted({key, *columns}, key=pf.schema_arrow.names.index)
        table = pf.read_row_groups(groups, columns=read)
        table = table.filter(pc.is_in(table.column(key), value_set=pa.array(keys, pa.string())))
        rows += table.to_pylist()
    return rows
