"""The DuckDB lineage store: runs, stage runs, artifacts and their edges, tombstones, schema migrations.

Only the flow process (or a CLI command a user runs) writes the ``.duckdb`` file, in short transactions:
DuckDB allows one writing process. Stages and workers write the per-document ledger as sorted Parquet inside
their artifacts (``ledger/ledger-*.parquet`` with an index, ``storage.ledger``); see
``storage.lineage_queries`` for the questions users ask.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import duckdb

from storage.artifacts import Manifest, ledger_folder, located_under, pid_alive
from storage.redaction import redact_config

# Each migration moves the schema from version i to i + 1; never edit one that has shipped, append a new one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE runs (
        run_id VARCHAR PRIMARY KEY, pipeline VARCHAR, flow_run_id VARCHAR, config JSON, code_version VARCHAR,
        package_version VARCHAR, seed BIGINT, status VARCHAR, started_at TIMESTAMPTZ, ended_at TIMESTAMPTZ,
        error VARCHAR
    );
    CREATE TABLE stage_runs (
        run_id VARCHAR, stage VARCHAR, fingerprint VARCHAR, status VARCHAR, attempt INTEGER,
        started_at TIMESTAMPTZ, ended_at TIMESTAMPTZ, elapsed_s DOUBLE, counts JSON, error VARCHAR
    );
    CREATE TABLE artifacts (
        stage VARCHAR, fingerprint VARCHAR, uri VARCHAR, content_hash VARCHAR, version VARCHAR, params JSON,
        counts JSON, n_files INTEGER, n_bytes BIGINT, created_at TIMESTAMPTZ, run_id VARCHAR,
        PRIMARY KEY (stage, fingerprint)
    );
    CREATE TABLE artifact_edges (
        src_stage VARCHAR, src_fingerprint VARCHAR, dst_stage VARCHAR, dst_fingerprint VARCHAR, relation VARCHAR,
        PRIMARY KEY (src_stage, src_fingerprint, dst_stage, dst_fingerprint)
    );
    """,
    """
    ALTER TABLE artifact_edges ADD COLUMN coverage JSON;
    CREATE TABLE tombstones (
        doc_id VARCHAR, content_hash VARCHAR, reason VARCHAR, requested_by VARCHAR, created_at TIMESTAMPTZ
    );
    """,
    """
    ALTER TABLE runs ADD COLUMN host VARCHAR;
    ALTER TABLE runs ADD COLUMN pid INTEGER;
    """,
    """
    CREATE TABLE train_metrics (
        fingerprint VARCHAR, step BIGINT, tokens BIGINT, loss DOUBLE, val_loss DOUBLE, lr DOUBLE, grad_norm DOUBLE,
        tokens_per_s DOUBLE, mfu DOUBLE, peak_mem_mb DOUBLE, train_seconds DOUBLE, run_id VARCHAR,
        PRIMARY KEY (fingerprint, step)
    );
    """,
    """
    CREATE TABLE metrics (
        run_id VARCHAR, stage VARCHAR, split VARCHAR, source VARCHAR, scorer VARCHAR, metric VARCHAR, value DOUBLE,
        step BIGINT
    );
    CREATE TABLE samples (run_id VARCHAR, idx INTEGER, prompt VARCHAR, completion VARCHAR, seed BIGINT);
    CREATE TABLE reports (run_id VARCHAR, format VARCHAR, path VARCHAR, created_at TIMESTAMPTZ);
    """,
    """
    CREATE TABLE refresh_diffs (
        run_id VARCHAR, previous_run_id VARCHAR, source VARCHAR, added BIGINT, removed BIGINT, changed BIGINT,
        unchanged BIGINT, computed_at TIMESTAMPTZ, PRIMARY KEY (run_id, source)
    );
    """,
    """
    CREATE TABLE sweeps (
        sweep_id VARCHAR PRIMARY KEY, name VARCHAR, spec JSON, base_config JSON, objective VARCHAR,
        sampler VARCHAR, trials_planned INTEGER, eval_set VARCHAR, status VARCHAR, winner INTEGER,
        flow_run_id VARCHAR, started_at TIMESTAMPTZ, ended_at TIMESTAMPTZ, error VARCHAR
    );
    CREATE TABLE trials (
        sweep_id VARCHAR, trial INTEGER, run_id VARCHAR, params JSON, fingerprints JSON, status VARCHAR,
        objective DOUBLE, val_loss DOUBLE, val_bpb DOUBLE, eval_docs INTEGER, eval_bytes BIGINT,
        eval_docs_in_train INTEGER, pruned BOOLEAN, stopped_at_step BIGINT, selected BOOLEAN, attempts INTEGER,
        curve JSON, elapsed_s DOUBLE, error VARCHAR, recorded_at TIMESTAMPTZ, PRIMARY KEY (sweep_id, trial)
    );
    CREATE TABLE test_reads (
        sweep_id VARCHAR, sweep_name VARCHAR, trial INTEGER, run_id VARCHAR, train_fingerprint VARCHAR,
        test_set VARCHAR, evaluate_fingerprint VARCHAR, test_loss DOUBLE, test_bpb DOUBLE, override BOOLEAN,
        read_at TIMESTAMPTZ
    );
    """,
    """
    ALTER TABLE artifact_edges ADD COLUMN tokens_per_source JSON;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
TRAIN_METRIC_COLUMNS = (
    "step",
    "tokens",
    "loss",
    "val_loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    "peak_mem_mb",
    "train_seconds",
)

TRIAL_COLUMNS = (
    "trial",
    "run_id",
    "params",
    "fingerprints",
    "status",
    "objective",
    "val_loss",
    "val_bpb",
    "eval_docs",
    "eval_bytes",
    "eval_docs_in_train",
    "pruned",
    "stopped_at_step",
    "attempts",
    "curve",
    "elapsed_s",
    "error",
)
TEST_READ_COLUMNS = (
    "sweep_id",
    "sweep_name",
    "trial",
    "run_id",
    "train_fingerprint",
    "test_set",
    "evaluate_fingerprint",
    "test_loss",
    "test_bpb",
    "override",
)

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


class LineageDBError(RuntimeError):
    """The lineage file cannot be used as it is (unreadable, or a read-only open finds it needs a migration).

    Its message is one line that says what to do; the CLI prints it without a traceback."""


def unreadable(path: Path, err: BaseException) -> LineageDBError:
    """The error for a lineage file DuckDB cannot open or read, with the documented recovery."""
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return LineageDBError(
        f"lineage DB {path} is unreadable ({reason}). Recovery (docs/reliability.md): restore it from a backup, "
        f"or move it aside (mv {path} {path}.corrupt) — the next run starts a new one and reuses every artifact, "
        "but the old runs' history and takedown tombstones stay only in the moved file"
    )


def _is_lock_error(err: BaseException) -> bool:
    return isinstance(err, duckdb.IOException) and "lock" in str(err).lower()


def _is_damage(err: BaseException, path: Path) -> bool:
    """Whether a DuckDB error says the lineage file itself is bad (truncated, checksum, not a database) — not the
    query, a lock, or a ledger Parquet file it read."""
    message = str(err)
    return not _is_lock_error(err) and (str(path) in message or "database file" in message.lower())


@contextmanager
def _explained(path: Path) -> Iterator[None]:
    """Turn DuckDB's error for a damaged lineage file into ``LineageDBError`` with the recovery; others pass."""
    try:
        yield
    except duckdb.Error as err:
        if _is_damage(err, path):
            raise unreadable(path, err) from err
        raise


def _open_or_explain(path: Path, open_fn: Any) -> Any:
    """``open_fn()`` (retried while another process holds the write lock); a damaged file as ``LineageDBError``."""
    with _explained(path):
        return retry_while_locked(open_fn)


# Open read connections per database file in this process: a writer in the same process must close them first
# (DuckDB refuses a read-write and a read-only connection to one file in one process at the same time).
_READERS: dict[Path, weakref.WeakSet[LineageStore]] = {}


class _Attachments:
    """Read access to lineage files through one in-memory DuckDB instance per process.

    Opening a DuckDB database costs ≈20 ms (its catalog is built on every open), more than a whole point query;
    attaching a file to an instance that already exists costs ≈1 ms. Readers get a cursor of the shared
    instance with the file attached read-only; the file is detached when its last reader closes, so no
    process holds DuckDB's file lock between questions.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._db: duckdb.DuckDBPyConnection | None = None
        self._attached: dict[Path, tuple[str, int]] = {}
        self._serial = 0

    def open(self, path: Path) -> duckdb.DuckDBPyConnection:
        with self._lock:
            if self._db is None:
                self._db = duckdb.connect()
                self._db.execute("SET parquet_metadata_cache = true")
            alias, users = self._attached.get(path, ("", 0))
            if not users:
                self._serial += 1
                alias = f"lineage_{self._serial}"
                mode = " (READ_ONLY)" if path.exists() else ""
                quoted = str(path).replace("'", "''")
                _open_or_explain(path, lambda: self._db.execute(f"ATTACH '{quoted}' AS {alias}{mode}"))
            self._attached[path] = (alias, users + 1)
            cursor = self._db.cursor()
        cursor.execute(f"USE {alias}")
        return cursor

    def close(self, path: Path, cursor: duckdb.DuckDBPyConnection) -> None:
        cursor.close()
        with self._lock:
            alias, users = self._attached[path]
            if users > 1:
                self._attached[path] = (alias, users - 1)
            else:
                del self._attached[path]
                self._db.execute(f"DETACH {alias}")


_ATTACHMENTS = _Attachments()


def retry_while_locked(open_fn: Any, timeout_s: float = 60) -> Any:
    """Call ``open_fn`` until it succeeds, retrying while another process holds DuckDB's write lock."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return open_fn()
        except duckdb.IOException as err:
            if not _is_lock_error(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class LineageStore:
    """Writes and reads one lineage ``.duckdb`` file.

    Each read opens a read-only connection and closes it again, so no process holds DuckDB's file lock
    between questions; inside ``with store.reading():`` the queries of one question share one connection
    (and DuckDB's Parquet metadata cache). A write from this process closes open readers first.

    ``read_only=True`` (every lineage question) never opens the file for writing, so a root on read-only
    storage can be queried; a file whose schema is older than this code then raises ``LineageDBError`` saying
    how to migrate it (``tokenmill lineage migrate``), instead of migrating it.
    """

    def __init__(self, path: str | Path, read_only: bool = False):
        self.path = Path(path).resolve()
        self._reader: duckdb.DuckDBPyConnection | None = None
        self._reading = 0
        if read_only:
            if not self.path.exists():
                raise FileNotFoundError(f"no lineage DB at {self.path}: run the pipeline first")
            self._check_schema()
            return
        with self._connect() as con:
            self._migrate(con)

    def _check_schema(self) -> None:
        """Refuse (read-only) a file whose schema this code cannot read as it is."""
        try:
            rows = self.query("SELECT max(version) AS v FROM schema_version")
        except duckdb.CatalogException:
            rows = [{"v": 0}]
        current = rows[0]["v"] or 0
        if current > SCHEMA_VERSION:
            raise LineageDBError(
                f"lineage DB {self.path} has schema version {current}, this tokenmill knows {SCHEMA_VERSION}: "
                "upgrade tokenmill"
            )
        if current < SCHEMA_VERSION:
            raise LineageDBError(
                f"lineage DB {self.path} has schema version {current}, this tokenmill needs {SCHEMA_VERSION}: "
                f"migrate it once with `tokenmill lineage migrate --root {self.path.parent}` (needs write access; "
                "a copy works too), then ask again"
            )

    @staticmethod
    def _migrate(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")
        row = con.execute("SELECT max(version) FROM schema_version").fetchone()
        current = row[0] or 0
        if current > SCHEMA_VERSION:
            raise LineageDBError(
                f"lineage DB schema is version {current}, this tokenmill knows {SCHEMA_VERSION}: upgrade tokenmill"
            )
        for version in range(current, SCHEMA_VERSION):
            con.execute("BEGIN")
            con.execute(MIGRATIONS[version])
            con.execute("INSERT INTO schema_version VALUES (?)", [version + 1])
            con.execute("COMMIT")

    @contextmanager
    def reading(self) -> Iterator[LineageStore]:
        """Share one read connection among the queries inside this block; close it when the block ends."""
        self._reading += 1
        try:
            yield self
        finally:
            self._reading -= 1
            if self._reading == 0:
                self.close()

    def close(self) -> None:
        """Close this store's read connection (reopened on the next read)."""
        if self._reader is not None:
            reader, self._reader = self._reader, None
            _ATTACHMENTS.close(self.path, reader)

    def _read_connection(self) -> duckdb.DuckDBPyConnection:
        if self._reader is None:
            self._reader = _ATTACHMENTS.open(self.path)
            _READERS.setdefault(self.path, weakref.WeakSet()).add(self)
        return self._reader

    @contextmanager
    def _connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived read-write connection for one write transaction (this process's readers close first)."""
        for reader in list(_READERS.get(self.path, ())):
            reader.close()
        con = _open_or_explain(self.path, lambda: duckdb.connect(str(self.path)))
        try:
            with _explained(self.path):
                yield con
        finally:
            con.close()

    # --- writes -----------------------------------------------------------------------------------------

    def start_run(self, run_id: str, pipeline: str, config: dict, seed: int, flow_run_id: str | None) -> None:
        """Record a run as running, and mark runs of this host whose process died (SIGKILL, OOM) as crashed."""
        host = socket.gethostname()
        with self._connect() as con:
            stale = con.execute(
                "SELECT run_id, pid FROM runs WHERE status = 'running' AND host = ? AND run_id <> ?", [host, run_id]
            ).fetchall()
            for stale_id, pid in stale:
                if pid is not None and not pid_alive(pid):
                    con.execute(
                        "UPDATE runs SET status = 'crashed', error = ? WHERE run_id = ?",
                        [f"process {pid} died without finishing the run", stale_id],
                    )
            con.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, NULL, NULL, ?, ?)",
                [
                    run_id,
                    pipeline,
                    flow_run_id,
                    json.dumps(redact_config(config)),  # credentials never reach the file
                    code_version(),
                    package_version(),
                    seed,
                    _now(),
                    host,
                    os.getpid(),
                ],
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
                    manifest.location,
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
            for row in manifest.counts.get("telemetry") or []:  # the train stage's per-eval-interval metrics
                con.execute(
                    "INSERT OR IGNORE INTO train_metrics VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [manifest.fingerprint, *(row.get(c) for c in TRAIN_METRIC_COLUMNS), manifest.run_id],
                )
            for ref in manifest.inputs:
                coverage = self._coverage(con, manifest.stage, ref.stage, ref.fingerprint)
                con.execute(
                    "INSERT OR IGNORE INTO artifact_edges VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        ref.stage,
                        ref.fingerprint,
                        manifest.stage,
                        manifest.fingerprint,
                        RELATIONS.get(manifest.stage, "derived_from"),
                        json.dumps(coverage) if coverage is not None else None,
                        json.dumps(realized) if (realized := self._realized(manifest, ref.stage)) else None,
                    ],
                )

    @staticmethod
    def _realized(manifest: Manifest, src_stage: str) -> dict | None:
        """Training tokens per source that a weighted model read (its trained_on edge carries them)."""
        if manifest.stage != "train" or src_stage != "tokenize":
            return None
        return manifest.counts.get("tokens_per_source")

    @staticmethod
    def _coverage(con: duckdb.DuckDBPyConnection, dst_stage: str, src_stage: str, src_fp: str) -> dict | None:
        """Which token shards (and how many tokens of each) a model trained or was evaluated on."""
        if src_stage != "tokenize" or dst_stage not in RELATIONS:
            return None
        row = con.execute(
            "SELECT counts FROM artifacts WHERE stage = 'tokenize' AND fingerprint = ?", [src_fp]
        ).fetchone()
        if row is None:
            return None
        splits = json.loads(row[0]).get("splits", {})
        wanted = ("train",) if dst_stage == "train" else ("val", "test")
        return {s["shard"]: s["tokens"] for split in wanted for s in splits.get(split, {}).get("shards", [])}

    def add_tombstones(self, rows: list[dict[str, Any]]) -> int:
        """Record documents (by id and content hash) that every later run's clean stage must drop."""
        with self._connect() as con:
            for row in rows:
                con.execute(
                    "INSERT INTO tombstones VALUES (?, ?, ?, ?, ?)",
                    [row.get("doc_id"), row.get("content_hash"), row.get("reason"), row.get("requested_by"), _now()],
                )
        return len(rows)

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

    def start_sweep(self, sweep: dict[str, Any]) -> None:
        """Record a sweep as running (a rerun of the same sweep id keeps its trials and test reads)."""
        columns = ("sweep_id", "name", "spec", "base_config", "objective", "sampler", "trials_planned", "eval_set")
        with self._connect() as con:
            con.execute("DELETE FROM sweeps WHERE sweep_id = ?", [sweep["sweep_id"]])
            con.execute(
                f"INSERT INTO sweeps ({', '.join(columns)}, status, flow_run_id, started_at) "
                f"VALUES ({', '.join('?' * len(columns))}, 'running', ?, ?)",
                [*(sweep.get(c) for c in columns), sweep.get("flow_run_id"), _now()],
            )

    def finish_sweep(self, sweep_id: str, status: str, winner: int | None, error: str | None = None) -> None:
        with self._connect() as con:
            con.execute(
                "UPDATE sweeps SET status = ?, winner = ?, ended_at = ?, error = ? WHERE sweep_id = ?",
                [status, winner, _now(), error, sweep_id],
            )
            con.execute("UPDATE trials SET selected = (trial = ?) WHERE sweep_id = ?", [winner, sweep_id])

    def record_trial(self, sweep_id: str, row: dict[str, Any]) -> None:
        """Insert or replace one trial's outcome (params, fingerprints, objective, status, curve)."""
        values = {c: row.get(c) for c in TRIAL_COLUMNS}
        for key in ("params", "fingerprints", "curve"):
            values[key] = json.dumps(values[key]) if values[key] is not None else None
        with self._connect() as con:
            con.execute("DELETE FROM trials WHERE sweep_id = ? AND trial = ?", [sweep_id, row["trial"]])
            con.execute(
                f"INSERT INTO trials (sweep_id, {', '.join(TRIAL_COLUMNS)}, selected, recorded_at) "
                f"VALUES (?, {', '.join('?' * len(TRIAL_COLUMNS))}, false, ?)",
                [sweep_id, *values.values(), _now()],
            )

    def record_test_read(self, row: dict[str, Any]) -> None:
        """Record that a sweep evaluated a trial on its test split (``test_reads`` is append-only)."""
        with self._connect() as con:
            con.execute(
                f"INSERT INTO test_reads ({', '.join(TEST_READ_COLUMNS)}, read_at) "
                f"VALUES ({', '.join('?' * len(TEST_READ_COLUMNS))}, ?)",
                [*(row.get(c) for c in TEST_READ_COLUMNS), _now()],
            )

    # --- reads ------------------------------------------------------------------------------------------

    def sweep(self, sweep_id: str) -> dict:
        """A sweep by id, or the newest sweep of that name."""
        rows = self.query(
            "SELECT * FROM sweeps WHERE sweep_id = ? OR name = ? ORDER BY sweep_id = ? DESC, started_at DESC LIMIT 1",
            [sweep_id, sweep_id, sweep_id],
        )
        if not rows:
            raise LookupError(f"no sweep {sweep_id!r} in {self.path}; `tokenmill lineage sweeps` lists them")
        return rows[0]

    def sweeps(self, limit: int = 20) -> list[dict]:
        return self.query(
            "SELECT sweep_id, name, objective, sampler, trials_planned, status, winner, started_at FROM sweeps "
            "ORDER BY started_at DESC LIMIT ?",
            [limit],
        )

    def trials(self, sweep_id: str) -> list[dict]:
        rows = self.query("SELECT * FROM trials WHERE sweep_id = ? ORDER BY trial", [sweep_id])
        for row in rows:
            for key in ("params", "fingerprints", "curve"):
                row[key] = json.loads(row[key]) if row[key] else None
        return rows

    def test_reads(self, sweep_id: str | None = None, name: str | None = None) -> list[dict]:
        """Test evaluations recorded for a sweep id, or for every sweep of a name."""
        return self.query(
            "SELECT * FROM test_reads WHERE sweep_id = ? OR sweep_name = ? ORDER BY read_at", [sweep_id, name]
        )

    def record_refresh_diff(self, run_id: str, previous_run_id: str | None, rows: list[dict]) -> None:
        """Store a refresh's per-source document diff (``LineageQueries.diff``) against ``previous_run_id``."""
        with self._connect() as con:
            con.execute("DELETE FROM refresh_diffs WHERE run_id = ?", [run_id])
            for r in rows:
                values = [r["source"], r["added"], r["removed"], r["changed"], r["unchanged"]]
                con.execute(
                    "INSERT INTO refresh_diffs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [run_id, previous_run_id, *values, _now()],
                )

    def located(self, rows: list[dict], stage: str = "stage", fingerprint: str = "fingerprint") -> list[dict]:
        """``rows`` with each artifact ``uri`` resolved under the root this file lies in (``located_under``)."""
        root = self.path.parent
        for row in rows:
            row["uri"] = located_under(root, row[stage], row[fingerprint], row["uri"])
        return rows

    def query(self, sql: str, params: list[Any] | None = None) -> list[dict]:
        with self.reading(), _explained(self.path):
            cursor = self._read_connection().execute(sql, params or [])
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def tombstones(self) -> list[dict]:
        return self.query("SELECT doc_id, content_hash, reason FROM tombstones ORDER BY created_at, doc_id")

    def runs(self, limit: int = 20) -> list[dict]:
        return self.query(
            "SELECT run_id, pipeline, status, started_at, ended_at, code_version, error FROM runs "
            "ORDER BY started_at DESC LIMIT ?",
            [limit],
        )

    def run(self, run_id: str) -> dict:
        rows = self.query("SELECT * FROM runs WHERE run_id = ?", [run_id])
        if not rows:
            raise LookupError(f"no run {run_id!r} in {self.path}; `tokenmill lineage runs` lists them")
        return rows[0]

    def latest_run_id(self, status: str | None = None) -> str | None:
        where = "WHERE status = ?" if status else ""
        rows = self.query(
            f"SELECT run_id FROM runs {where} ORDER BY started_at DESC LIMIT 1", [status] if status else []
        )
        return rows[0]["run_id"] if rows else None

    def train_metrics(self, fingerprint: str) -> list[dict]:
        """Loss, lr, grad norm, tokens/s, MFU and peak memory per eval interval of one training run."""
        return self.query("SELECT * FROM train_metrics WHERE fingerprint = ? ORDER BY step", [fingerprint])

    def stage_runs(self, run_id: str) -> list[dict]:
        return self.query(
            "SELECT stage, fingerprint, status, attempt, elapsed_s, counts, error FROM stage_runs "
            "WHERE run_id = ? ORDER BY started_at",
            [run_id],
        )

    def run_artifacts(self, run_id: str) -> list[dict]:
        """The artifacts a run produced or reused (its latest successful attempt per stage), under this root."""
        return self.located(
            self.query(
                """
            SELECT a.* FROM artifacts a JOIN (
                SELECT stage, arg_max(fingerprint, started_at) AS fingerprint FROM stage_runs
                WHERE run_id = ? AND status IN ('completed', 'cached') GROUP BY stage
            ) s USING (stage, fingerprint)
            """,
                [run_id],
            )
        )

    def ledger_files(self, run_id: str, stages: tuple[str, ...] | None = None) -> list[str]:
        files = []
        for artifact in self.run_artifacts(run_id):
            if stages is None or artifact["stage"] in stages:
                files += sorted(str(p) for p in ledger_folder(artifact["uri"]).glob("ledger/*.parquet"))
        return files

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

    def run_for_flow_run(self, flow_run_id: str) -> str | None:
        """The lineage run a Prefect flow run started (a retried flow run continues it)."""
        rows = self.query("SELECT run_id FROM runs WHERE flow_run_id = ? ORDER BY started_at LIMIT 1", [flow_run_id])
        return rows[0]["run_id"] if rows else None

    def latest_completed_run(self, pipeline: str, before: str | None = None) -> str | None:
        """The newest completed run of ``pipeline`` (other than ``before``): the baseline of a refresh diff."""
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
