"""Lineage that survives the machine: a consistent snapshot of the lineage DuckDB file next to the artifacts.

On an object-store root the lineage file lives in the local mirror (DuckDB needs a local file to write), so a
lost machine would lose the record of every run. After each run the flow process copies the database in one
read transaction (``COPY FROM DATABASE``: a consistent copy even while a reader is open), uploads it as a new
object ``<root>/lineage/lineage-<time>-<nonce>.duckdb`` and then replaces ``<root>/lineage/LATEST``, a small
JSON pointer naming that object with its SHA-256: a reader sees the previous snapshot or the new one, never a
partial upload. On a machine without a local lineage file, opening the root restores the latest snapshot
(checked against the pointer's hash) before anything reads or writes lineage.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from storage.hashing import file_sha256
from storage.remote import RemoteRoot

FOLDER = "lineage"
POINTER = "LATEST"


def snapshot_lineage(remote: RemoteRoot, path: Path, run_id: str | None = None) -> str | None:
    """Upload a consistent copy of the lineage file at ``path``; returns the snapshot's URI (None: no file)."""
    if not path.exists():
        return None
    with tempfile.TemporaryDirectory(prefix="lineage-snapshot-", dir=path.parent) as scratch:
        copy = Path(scratch) / "lineage.duckdb"
        con = duckdb.connect()
        try:
            con.execute(f"ATTACH '{path}' AS src (READ_ONLY)")
            con.execute(f"ATTACH '{copy}' AS dst")
            con.execute("COPY FROM DATABASE src TO dst")
        finally:
            con.close()
        name = f"lineage-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}.duckdb"
        pointer = {
            "object": name,
            "bytes": copy.stat().st_size,
            "sha256": file_sha256(copy),
            "run_id": run_id,
            "created_at": datetime.now(UTC).isoformat(),
        }
        base = f"{remote.uri}/{FOLDER}"
        previous = _pointer(remote)
        remote.fs.put_file(str(copy), remote.object_key(FOLDER, name))
        remote.fs.pipe_file(remote.object_key(FOLDER, POINTER), json.dumps(pointer, indent=2).encode())
    if previous and previous["object"] != name:  # the pointer no longer names it
        remote.fs.rm(remote.object_key(FOLDER, previous["object"]))
    return f"{base}/{name}"


def restore_lineage(remote: RemoteRoot, path: Path) -> bool:
    """Download the latest snapshot to ``path`` when there is no local lineage file; True if it restored one."""
    if path.exists():
        return False
    pointer = _pointer(remote)
    if pointer is None:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.restore-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        remote.fs.get_file(remote.object_key(FOLDER, pointer["object"]), str(tmp))
        if tmp.stat().st_size != pointer["bytes"] or file_sha256(tmp) != pointer["sha256"]:
            raise RuntimeError(
                f"lineage snapshot {remote.uri}/{FOLDER}/{pointer['object']} does not match its pointer "
                f"({POINTER}); delete the pointer to start a new lineage file, or restore an older snapshot"
            )
        try:
            os.link(tmp, path)  # never replaces a lineage file another process created meanwhile
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _pointer(remote: RemoteRoot) -> dict | None:
    try:
        return json.loads(remote.fs.cat_file(remote.object_key(FOLDER, POINTER)))
    except FileNotFoundError:
        return None
