"""The DuckDB lineage store: runs, stage runs, artifacts and their edges, plus queries over the Parquet ledger.

Only the flow process writes the ``.duckdb`` file, in short transactions (DuckDB allows one writing
process); stages and workers write the per-document ledger as Parquet inside their artifacts, and DuckDB
queries those files in place.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import duckdb

from storage.artifacts import Manifest

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER);
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY, pipeline VARCHAR, flow_run_id VARCHAR, config JSON, code_version VARCHAR,
    package_version VARCHAR, seed BIGINT, status VARCHAR, started_at TIMESTAMPTZ, ended_at TIMESTAMPTZ,
    error VARCHAR
);
CREATE TABLE IF NOT EXISTS stage_runs (
    run_id VARCHAR, stage VARCHAR, fingerprint VARCHAR, status VARCHAR, attempt INTEGER,
    started_at TIMESTAMPTZ, ended_at TIMESTAMPTZ, elapsed_s DOUBLE, counts JSON, error VARCHAR
);
CREATE TABLE IF NOT EXISTS artifacts (
    stage VARCHAR, fingerprint VARCHAR, uri VARCHAR, content_hash VARCHAR, version VARCHAR, params JSON,
    counts JSON, n_files INTEGER, n_bytes BIGINT, created_at TIMESTAMPTZ, run_id VARCHAR,
    PRIMARY KEY (stage, fingerprint)
);
CREATE TABLE IF NOT EXISTS refresh_diffs (
    run_id VARCHAR, previous_run_id VARCHAR, source VARCHAR, added BIGINT, removed BIGINT, changed BIGINT,
    unchanged BIGINT, computed_at TIMESTAMPTZ, PRIMARY KEY (run_id, source)
);
CREATE TABLE IF NOT EXISTS artifact_edges (
    src_stage VARCHAR, src_fingerprint VARCHAR, dst_stage VARCHAR, dst_fingerprint VARCHAR, relation VARCHAR,
    PRIMARY KEY (src_stage, src_fingerprint, dst_stage, dst_fingerprint)
);
"""

RELATIONS = {"train": "trained_on", "evaluate": "evaluated_on"}


def code_version() -> str:
    """The git commit of the tokenmill checkout, if it is one (with ``-dirty`` for local changes)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_version() -> str:
    try:
        return metadata.version("tokenmill")
    except metadata.PackageNotFoundError:
        return "unknown"


def _now() -> datetime:
    return datetime.now(UTC)


class LineageStore:
    """Writes and queries one lineage ``.duckdb`` file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with self._connect() as con:
            con.execute(SCHEMA)
            if not con.execute("SELECT count(*) FROM schema_version").fetchone()[0]:
                con.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION])

    @contextmanager
    def _connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open briefly, retrying while another process holds the write lock."""
        deadline = time.monotonic() + 30
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only and self.path.exists())
                break
            except duckdb.IOException as err:
                if "lock" not in str(err).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        try:
            yield con
        finally:
            con.close()

    # --- writes (flow process only) ---------------------------------------------------------------------

    def start_run(self, run_id: str, pipeline: str, config: dict, seed: int, flow_run_id: str | None) -> None:
        with self._connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, NULL, NULL)",
                [run_id, pipeline, flow_run_id, json.dumps(config), code_version(), package_version(), seed, _now()],
            )

    def finish_run(self, run_id: str, status: str, error: str | None = None) -> None:
        with self._connect() as con:
            con.execute(
                "UPDATE runs SET status = ?, ended_at = ?, error = ? WHERE run_id = ?", [status, _now(), error, run_id]
            )

    def record_stage(
        self,
        run_id: str,
        stage: str,
        status: str,
        started_at: datetime,
        manifest: Manifest | None = None,
        error: str | None = None,
        fingerprint: str | None = None,
    ) -> None:
        """Record one stage attempt and, when it produced or reused an artifact, the artifact and its edges."""
        ended = _now()
        with self._connect() as con:
            attempt = con.execute(
                "SELECT count(*) + 1 FROM stage_runs WHERE run_id = ? AND stage = ?", [run_id, stage]
            ).fetchone()[0]
            con.execute(
                "INSERT INTO stage_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    run_id,
                    stage,
                    manifest.fingerprint if manifest else fingerprint,
                    status,
                    attempt,
                    started_at,
                    ended,
                    (ended - started_at).total_seconds(),
                    json.dumps(manifest.counts) if manifest else None,
                    error,
                ],
            )
            if manifest is None:
                return
            con.execute(
                "INSERT OR IGNORE INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    manifest.stage,
                    manifest.fingerprint,
                    manifest.path,
                    manifest.content_hash,
                    manifest.version,
                    json.dumps(manifest.params),
                    json.dumps(manifest.counts),
                    len(manifest.files),
                    sum(f.bytes for f in manifest.files),
                    manifest.created_at,
                    manifest.run_id,
                ],
            )
            for ref in manifest.inputs:
                con.execute(
                    "INSERT OR IGNORE INTO artifact_edges VALUES (?, ?, ?, ?, ?)",
                    [
                        ref.stage,
                        ref.fingerprint,
                        manifest.stage,
                        manifest.fingerprint,
                        RELATIONS.get(manifest.stage, "derived_from"),
                    ],
                )

    def record_refresh_diff(self, run_id: str, previous_run_id: str | None, rows: list[dict]) -> None:
        """Store a refresh's per-source document diff (see ``source_diff``) against ``previous_run_id``."""
        with self._connect() as con:
            con.execute("DELETE FROM refresh_diffs WHERE run_id = ?", [run_id])
            for r in rows:
                con.execute(
                    "INSERT INTO refresh_diffs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        run_id,
                        previous_run_id,
                        r["source"],
                        r["added"],
                        r["removed"],
                        r["changed"],
                        r["unchanged"],
                        _now(),
                    ],
                )

    # --- queries ----------------------------------------------------------------------------------------

    def query(self, sql: str, params: list[Any] | None = None) -> list[dict]:
        with self._connect(read_only=True) as con:
            cursor = con.execute(sql, params or [])
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def runs(self, limit: int = 20) -> list[dict]:
        return self.query(
            "SELECT run_id, pipeline, status, started_at, ended_at, code_version, error FROM runs "
            "ORDER BY started_at DESC LIMIT ?",
            [limit],
        )

    def latest_run_id(self) -> str | None:
        rows = self.query("SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1")
        return rows[0]["run_id"] if rows else None

    def stage_runs(self, run_id: str) -> list[dict]:
        return self.query(
            "SELECT stage, fingerprint, status, attempt, elapsed_s, counts, error FROM stage_runs "
            "WHERE run_id = ? ORDER BY started_at",
            [run_id],
        )

    def run_artifacts(self, run_id: str) -> list[dict]:
        """The artifacts a run produced or reused (its latest successful attempt per stage)."""
        return self.query(
            """
            SELECT a.* FROM artifacts a JOIN (
                SELECT stage, arg_max(fingerprint, started_at) AS fingerprint FROM stage_runs
                WHERE run_id = ? AND status IN ('completed', 'cached') GROUP BY stage
            ) s USING (stage, fingerprint)
            """,
            [run_id],
        )

    def ledger_files(self, run_id: str) -> list[str]:
        files = []
        for artifact in self.run_artifacts(run_id):
            files += sorted(str(p) for p in Path(artifact["uri"]).glob("ledger/*.parquet"))
        return files

    def document(self, doc_id: str, run_id: str | None = None) -> dict:
        """Where a document went in a run: every stage's decision, and the models that trained on its shard."""
        run_id = run_id or self.latest_run_id()
        if run_id is None:
            raise LookupError("no runs recorded yet")
        files = self.ledger_files(run_id)
        if not files:
            raise LookupError(f"run {run_id} has no ledger files")
        order = "CASE stage WHEN 'ingest' THEN 0 WHEN 'clean' THEN 1 WHEN 'dedup' THEN 2 ELSE 3 END"
        rows = self.query(
            f"SELECT * FROM read_parquet(?, union_by_name = true) WHERE doc_id = ? ORDER BY {order}", [files, doc_id]
        )
        if not rows:
            raise LookupError(f"document {doc_id} is not in run {run_id}")
        models = []
        if any(r["stage"] == "tokenize" for r in rows):
            models = self.query(
                "SELECT dst_fingerprint AS model FROM artifact_edges e JOIN stage_runs s "
                "ON s.stage = 'tokenize' AND s.fingerprint = e.src_fingerprint AND s.run_id = ? "
                "WHERE e.relation = 'trained_on' GROUP BY 1",
                [run_id],
            )
        return {"doc_id": doc_id, "run_id": run_id, "stages": rows, "models": [m["model"] for m in models]}

    def run_for_flow_run(self, flow_run_id: str) -> str | None:
        rows = self.query("SELECT run_id FROM runs WHERE flow_run_id = ? ORDER BY started_at LIMIT 1", [flow_run_id])
        return rows[0]["run_id"] if rows else None

    def run_config(self, run_id: str) -> dict:
        rows = self.query("SELECT config FROM runs WHERE run_id = ?", [run_id])
        if not rows:
            raise LookupError(f"run {run_id!r} is not in {self.path}")
        return json.loads(rows[0]["config"])

    def latest_completed_run(self, pipeline: str, before: str | None = None) -> str | None:
        """The newest completed run of ``pipeline`` (other than ``before``), the baseline of a refresh diff."""
        rows = self.query(
            "SELECT run_id FROM runs WHERE pipeline = ? AND status = 'completed' AND run_id IS DISTINCT FROM ? "
            "ORDER BY ended_at DESC LIMIT 1",
            [pipeline, before],
        )
        return rows[0]["run_id"] if rows else None

    def refresh_diffs(self, run_id: str) -> list[dict]:
        return self.query(
            "SELECT source, added, removed, changed, unchanged, previous_run_id FROM refresh_diffs "
            "WHERE run_id = ? ORDER BY source",
            [run_id],
        )


def _ledger_glob(artifact_uri: str | None) -> list[str]:
    return sorted(str(p) for p in Path(artifact_uri).glob("ledger/*.parquet")) if artifact_uri else []


def source_diff(old: dict[str, str | None], new: dict[str, str]) -> list[dict]:
    """Per source: documents added, removed, changed and unchanged between two runs' corpora.

    ``old`` and ``new`` map ``ingest`` and ``clean`` to artifact folders (``old`` may be empty: everything is
    then added). Presence comes from the ingest ledger (every record, kept or dropped); "changed" compares the
    clean ledger's ``content_hash`` (of the normalized text) per ``doc_id``, so whitespace-only edits count as
    unchanged and documents dropped at ingest count as unchanged while they stay present.
    """

    params: dict[str, list[str]] = {}

    def side(prefix: str, ingest: list[str], clean: list[str]) -> str:
        if not ingest:
            return "SELECT NULL::VARCHAR AS doc_id, NULL::VARCHAR AS source, NULL::VARCHAR AS content_hash LIMIT 0"
        params[f"{prefix}_ingest"] = ingest
        hashes = "SELECT NULL::VARCHAR AS doc_id, NULL::VARCHAR AS content_hash LIMIT 0"
        if clean:
            params[f"{prefix}_clean"] = clean
            hashes = (
                f"SELECT doc_id, any_value(content_hash) AS content_hash "
                f"FROM read_parquet(${prefix}_clean, union_by_name = true) GROUP BY doc_id"
            )
        return (
            f"SELECT i.doc_id, i.source, c.content_hash FROM read_parquet(${prefix}_ingest, union_by_name = true) i "
            f"LEFT JOIN ({hashes}) c USING (doc_id)"
        )

    old_sql = side("old", _ledger_glob(old.get("ingest")), _ledger_glob(old.get("clean")))
    new_sql = side("new", _ledger_glob(new.get("ingest")), _ledger_glob(new.get("clean")))
    sql = f"""
        SELECT coalesce(n.source, o.source) AS source,
               count(*) FILTER (WHERE o.doc_id IS NULL) AS added,
               count(*) FILTER (WHERE n.doc_id IS NULL) AS removed,
               count(*) FILTER (WHERE o.doc_id IS NOT NULL AND n.doc_id IS NOT NULL
                                AND o.content_hash IS DISTINCT FROM n.content_hash) AS changed,
               count(*) FILTER (WHERE o.doc_id IS NOT NULL AND n.doc_id IS NOT NULL
                                AND o.content_hash IS NOT DISTINCT FROM n.content_hash) AS unchanged
        FROM ({old_sql}) o FULL OUTER JOIN ({new_sql}) n ON o.doc_id = n.doc_id
        GROUP BY 1 ORDER BY 1
    """
    with duckdb.connect() as con:
        cursor = con.execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
