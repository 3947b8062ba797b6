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
CREATE TABLE IF NOT EXISTS artifact_edges (
    src_stage VARCHAR, src_fingerprint VARCHAR, dst_stage VARCHAR, dst_fingerprint VARCHAR, relation VARCHAR,
    PRIMARY KEY (src_stage, src_fingerprint, dst_stage, dst_fingerprint)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id VARCHAR, stage VARCHAR, split VARCHAR, source VARCHAR, scorer VARCHAR, metric VARCHAR, value DOUBLE,
    step BIGINT
);
CREATE TABLE IF NOT EXISTS samples (run_id VARCHAR, idx INTEGER, prompt VARCHAR, completion VARCHAR, seed BIGINT);
CREATE TABLE IF NOT EXISTS reports (run_id VARCHAR, format VARCHAR, path VARCHAR, created_at TIMESTAMPTZ);
"""

RELATIONS = {"train": "trained_on", "evaluate": "evaluated_on", "export": "exported_from"}


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

    def record_report(
        self, run_id: str, metrics: list[dict], samples: list[dict], paths: dict[str, str | Path]
    ) -> None:
        """Replace a run's metrics, samples and report paths (a run's report is written once, at its end)."""
        columns = ("stage", "split", "source", "scorer", "metric", "value", "step")
        with self._connect() as con:
            con.execute("BEGIN")
            for table in ("metrics", "samples", "reports"):
                con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
            if metrics:
                con.executemany(
                    "INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [[run_id, *(m.get(c) for c in columns)] for m in metrics],
                )
            if samples:
                con.executemany(
                    "INSERT INTO samples VALUES (?, ?, ?, ?, ?)",
                    [[run_id, i, s["prompt"], s["completion"], s.get("seed")] for i, s in enumerate(samples)],
                )
            for fmt, path in paths.items():
                con.execute("INSERT INTO reports VALUES (?, ?, ?, ?)", [run_id, fmt, str(path), _now()])
            con.execute("COMMIT")

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

    def metrics(self, run_id: str) -> list[dict]:
        return self.query(
            "SELECT stage, split, source, scorer, metric, value, step FROM metrics WHERE run_id = ? "
            "ORDER BY stage, split, source, scorer, metric, step",
            [run_id],
        )

    def previous_evaluated_run(self, pipeline: str, run_id: str) -> str | None:
        """The latest run of ``pipeline`` that started before ``run_id`` and has evaluation metrics."""
        rows = self.query(
            """
            SELECT r.run_id FROM runs r
            WHERE r.pipeline = ? AND r.run_id <> ?
              AND r.started_at <= coalesce((SELECT started_at FROM runs WHERE run_id = ?), now())
              AND EXISTS (SELECT 1 FROM metrics m WHERE m.run_id = r.run_id AND m.stage = 'evaluate')
            ORDER BY r.started_at DESC LIMIT 1
            """,
            [pipeline, run_id, run_id],
        )
        return rows[0]["run_id"] if rows else None
