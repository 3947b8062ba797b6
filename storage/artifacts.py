"""Content-addressed artifacts with manifests, published atomically.

Layout: ``<root>/<stage>/<fingerprint>/`` holds a stage's output files and ``manifest.json``. A stage writes
into a hidden temporary sibling (``.<fingerprint>.tmp-<pid>-<nonce>``), every file is fsynced, the manifest
is written last, and the folder is renamed into place: readers see a whole artifact or none. Resumable stages
(training) also get a persistent work folder ``.<fingerprint>.work`` that survives retries.

The root may also be an object store (``s3://bucket/prefix``): stages still write into a local staging folder,
and publishing uploads the files and commits the manifest last (``storage.remote``).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from storage.faults import maybe_fail
from storage.hashing import canonical_json, file_sha256, fingerprint
from storage.lineage_snapshot import restore_lineage, snapshot_lineage
from storage.remote import ATTEMPT_PREFIX, ATTEMPT_TIME, RemoteRoot, is_remote, local_mirror, local_path

MANIFEST = "manifest.json"


class FileEntry(BaseModel):
    path: str
    bytes: int
    sha256: str


class InputRef(BaseModel):
    stage: str
    fingerprint: str
    content_hash: str


class StageKey(BaseModel):
    """What identifies a stage's output: stage, code version, parameters and inputs. Its ``fingerprint`` is the
    artifact's folder name and the Prefect cache key; computed once per stage run and passed along."""

    stage: str
    version: str
    params: dict[str, Any]
    inputs: list[InputRef]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.stage, self.version, self.params, [i.content_hash for i in self.inputs])


class Manifest(BaseModel):
    """What a stage produced: files with hashes, counts, and what it was made from."""

    stage: str
    version: str
    fingerprint: str
    params: dict[str, Any]
    inputs: list[InputRef]
    files: list[FileEntry]
    content_hash: str
    counts: dict[str, Any]
    path: str
    created_at: str
    elapsed_s: float
    run_id: str | None = None
    uri: str | None = None  # remote roots: where the artifact is published; ``path`` is then its local copy
    attempt: str | None = None  # remote roots: the sub-folder of ``uri`` that holds the files

    @property
    def location(self) -> str:
        """Where the artifact is published: its URI on a remote root, else its folder (what lineage records)."""
        return self.uri or self.path

    def file(self, name: str) -> Path:
        return Path(self.path) / name

    def files_under(self, prefix: str, suffix: str = "") -> list[Path]:
        """Paths of this artifact's files whose relative path starts with ``prefix`` (sorted)."""
        return [Path(self.path) / f.path for f in self.files if f.path.startswith(prefix) and f.path.endswith(suffix)]

    def sources_under(self, prefix: str) -> list[str]:
        """Where workers read these files: their object URIs on a remote root, else their local paths."""
        if self.uri and self.attempt:
            return [f"{self.uri}/{self.attempt}/{f.path}" for f in self.files if f.path.startswith(prefix)]
        return [str(p) for p in self.files_under(prefix)]

    def ref(self) -> InputRef:
        return InputRef(stage=self.stage, fingerprint=self.fingerprint, content_hash=self.content_hash)


LEDGER_PREFIXES = ("ledger/", "ledger-index/")


def ledger_folder(uri: str) -> Path:
    """Where to read the ledger of the artifact lineage recorded at ``uri`` (see ``materialize_ledger``)."""
    if not is_remote(uri):
        return Path(uri)
    store, manifest = ArtifactStore.published_at(uri)
    return store.materialize_ledger(manifest)


def local_folder(uri: str) -> Path:
    """The local folder of the artifact lineage recorded at ``uri``: the folder itself, or for an artifact on an
    object store its verified local copy (downloaded on first use)."""
    if not is_remote(uri):
        return Path(uri)
    _, manifest = ArtifactStore.of_artifact(uri)
    return Path(manifest.path)


def artifact_folder(root: Path, stage: str, fp: str) -> Path:
    """The folder of an artifact in a local root (or a remote root's local mirror)."""
    return root / stage / fp


def located_under(root: Path, stage: str, fp: str, recorded: str | None) -> str | None:
    """Where an artifact lineage recorded at ``recorded`` is when the lineage of ``root`` is read.

    A remote URI stays as it is; a local artifact is ``<root>/<stage>/<fingerprint>`` of the root being read,
    wherever it was built, so lineage on a copied or moved root resolves (and verifies) that root's own files.
    """
    if recorded is None or is_remote(recorded):
        return recorded
    return str(artifact_folder(root, stage, fp))


class CorruptArtifactError(RuntimeError):
    """An artifact's files no longer match its manifest."""


@dataclass
class StageContext:
    """What a stage function gets: where to write, where to keep resumable state, and how to report."""

    out_dir: Path
    work_dir: Path
    log: Callable[[str], None] = print
    progress: Callable[[float, str], None] = field(default=lambda fraction, message: None)
    # Asked after each periodic validation of a training run: True stops it (a sweep pruning a weak trial).
    should_stop: Callable[[int, float], bool] = field(default=lambda step, val_loss: False)
    # Remote roots: the attempt folder this build publishes into. Parts may upload files there themselves (so
    # workers need no shared file system) and list them in ``uploaded``; the manifest names both kinds.
    attempt_uri: str | None = None
    uploaded: list[FileEntry] = field(default_factory=list)

    def parts_done(self, done: int, total: int, start: float = 0.0, share: float = 1.0, what: str = "parts") -> None:
        """Report ``done`` of ``total`` parts of a pass that covers ``share`` of the stage from ``start``."""
        self.progress(start + share * done / max(total, 1), f"{what} {done}/{total}")


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_read_only(folder: Path) -> None:
    """Local copies of published artifacts are inputs to other stages, never to be edited in place."""
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o444)


def _remove_tree(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def content_hash_of(files: list[FileEntry]) -> str:
    """The artifact's content hash: a hash over its files' relative paths and SHA-256 digests."""
    import hashlib

    listing = canonical_json(sorted((f.path, f.sha256) for f in files))
    return hashlib.sha256(listing.encode()).hexdigest()


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON next to ``path`` and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(value, fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class ArtifactStore:
    """The one place that knows the folder layout of a data root."""

    def __init__(self, root: str | Path):
        self.remote = RemoteRoot(str(root)) if is_remote(root) else None
        local = local_mirror(self.remote.uri) if self.remote else local_path(root)
        self.root = local.expanduser().resolve()  # on a remote root: its local mirror (storage.remote)
        self._lineage_checked = False
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def location(self) -> str:
        """The root as configured: the remote URI, or the local folder."""
        return self.remote.uri if self.remote else str(self.root)

    def artifact_dir(self, stage: str, fp: str) -> Path:
        return artifact_folder(self.root, stage, fp)

    def work_dir(self, stage: str, fp: str) -> Path:
        return self.root / stage / f".{fp}.work"

    def cache_dir(self, stage: str) -> Path:
        """Reusable intermediate pieces of a stage across runs (e.g. ingest's per-file fragments)."""
        return self.root / ".cache" / stage

    def shared_cache(self, stage: str) -> str | None:
        """On a remote root, where a stage's parts keep reusable pieces across runs on the object store itself,
        ``<root>/.cache/<stage>`` (workers share nothing else with this machine); None on a local root."""
        return f"{self.remote.uri}/.cache/{stage}" if self.remote else None

    @property
    def lineage_path(self) -> Path:
        """The lineage DuckDB file. On a remote root without one (a fresh machine), the latest snapshot in the
        bucket is restored first (``storage.lineage_snapshot``)."""
        path = self.root / "lineage.duckdb"
        if self.remote is not None and not self._lineage_checked:
            self._lineage_checked = True
            if restore_lineage(self.remote, path):
                print(f"lineage: restored the latest snapshot from {self.remote.uri}/lineage/", file=sys.stderr)
        return path

    def backup_lineage(self, run_id: str | None = None) -> str | None:
        """After a run on a remote root: put a consistent snapshot of the lineage file next to the artifacts."""
        if self.remote is None:
            return None
        return snapshot_lineage(self.remote, self.root / "lineage.duckdb", run_id)

    def report_dir(self, run_id: str) -> Path:
        """Where a pipeline run's human-readable report goes (run-level, not content-addressed)."""
        return self.root / "reports" / run_id

    @property
    def results_dir(self) -> Path:
        return self.root / ".prefect-results"

    def load(self, stage: str, fp: str) -> Manifest | None:
        if self.remote is not None:
            text = self.remote.read_manifest(stage, fp, MANIFEST)
            if text is None:
                return None
            local_copy = str(self.artifact_dir(stage, fp))
            return Manifest.model_validate_json(text).model_copy(update={"path": local_copy})
        path = self.artifact_dir(stage, fp) / MANIFEST
        if not path.exists():
            return None
        # the folder it is in now: a copied or moved root reads its own files, not the ones it was built in
        return Manifest.model_validate_json(path.read_text()).model_copy(update={"path": str(path.parent)})

    def published(self, stage: str) -> list[Manifest]:
        """Every committed artifact of ``stage`` in this root (remote ones not downloaded)."""
        if self.remote is not None:
            found = (self.load(stage, fp) for fp in self.remote.committed(stage, MANIFEST))
            return [m for m in found if m is not None]
        return [
            Manifest.model_validate_json(p.read_text()).model_copy(update={"path": str(p.parent)})
            for p in sorted((self.root / stage).glob(f"*/{MANIFEST}"))
        ]

    @staticmethod
    def published_at(uri: str) -> tuple[ArtifactStore, Manifest]:
        """The store and committed manifest of a remote artifact URI (``<root>/<stage>/<fingerprint>``)."""
        root, stage, fp = uri.rstrip("/").rsplit("/", 2)
        store = ArtifactStore(root)
        manifest = store.load(stage, fp)
        if manifest is None:
            raise FileNotFoundError(f"{uri} is not a tokenmill artifact (no committed {MANIFEST})")
        return store, manifest

    @staticmethod
    def of_artifact(folder: str | Path) -> tuple[ArtifactStore, Manifest]:
        """The store an artifact folder (``<root>/<stage>/<fingerprint>``) belongs to, and its manifest.

        A remote artifact URI (``s3://bucket/prefix/<stage>/<fingerprint>``) is resolved through its manifest and
        downloaded into the local mirror (once), so callers read ``manifest.path`` as for a local artifact.
        """
        if is_remote(folder):
            store, manifest = ArtifactStore.published_at(str(folder))
            store.materialize(manifest)
            return store, manifest
        folder = Path(folder).expanduser().resolve()
        path = folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a tokenmill artifact (no {MANIFEST})")
        manifest = Manifest.model_validate_json(path.read_text())
        return ArtifactStore(folder.parent.parent), manifest.model_copy(update={"path": str(folder)})

    def ancestors(self, manifest: Manifest) -> dict[str, Manifest]:
        """Every artifact upstream of ``manifest`` that this store holds, by stage (nearest first)."""
        found: dict[str, Manifest] = {}
        pending = list(manifest.inputs)
        while pending:
            ref = pending.pop(0)
            upstream = self.load(ref.stage, ref.fingerprint)
            if upstream is None or ref.stage in found:
                continue
            found[ref.stage] = upstream.model_copy(update={"path": str(self.artifact_dir(ref.stage, ref.fingerprint))})
            pending += upstream.inputs
        return found

    def verify(self, manifest: Manifest, deep: bool = True) -> None:
        """Raise CorruptArtifactError if a file is missing, resized or (deep) rehashes differently.

        On a remote root the manifest must still be the committed one, the published objects are checked for
        presence and size (one listing; they were hashed before upload), and a local copy, if there is one, is
        checked like a local artifact and dropped when it no longer matches (``materialize`` fetches it again).
        """
        if self.remote is not None and manifest.uri:
            committed = self.remote.read_manifest(manifest.stage, manifest.fingerprint, MANIFEST)
            if committed is None or Manifest.model_validate_json(committed).attempt != manifest.attempt:
                raise CorruptArtifactError(
                    f"{manifest.stage} artifact {manifest.fingerprint} is no longer published at {manifest.uri}"
                )
            problems = self.remote.problems(
                manifest.stage, manifest.fingerprint, manifest.attempt or "", {f.path: f.bytes for f in manifest.files}
            )
            if problems:
                raise CorruptArtifactError(f"{manifest.stage} artifact {manifest.fingerprint}: {'; '.join(problems)}")
            if (Path(manifest.path) / MANIFEST).is_file():
                try:
                    self._verify_files(manifest, deep)
                except CorruptArtifactError:
                    _remove_tree(Path(manifest.path))
            return
        self._verify_files(manifest, deep)

    def materialize(self, manifest: Manifest) -> None:
        """Make an artifact's files readable under ``manifest.path``, as a stage reading it needs.

        A local artifact already is. A remote one is downloaded once into the local mirror, every file checked
        against the manifest's SHA-256, and made read-only; later calls reuse that copy.
        """
        if self.remote is None or not manifest.uri:
            return
        self._download(manifest, Path(manifest.path))

    def materialize_ledger(self, manifest: Manifest) -> Path:
        """A local folder holding at least the artifact's ledger (``ledger/``, ``ledger-index/``), for lineage
        questions: the artifact itself when local or already downloaded, else a verified local copy of the
        ledger files alone, so documents and token shards stay on the object store."""
        if self.remote is None or not manifest.uri or (Path(manifest.path) / MANIFEST).is_file():
            return Path(manifest.path)
        ledger = [f for f in manifest.files if f.path.startswith(LEDGER_PREFIXES)]
        folder = self.root / ".ledgers" / manifest.stage / manifest.fingerprint
        self._download(manifest.model_copy(update={"files": ledger}), folder)
        return folder

    def _download(self, manifest: Manifest, folder: Path) -> None:
        """Download ``manifest.files`` into ``folder`` once: checked against their SHA-256, made read-only, and
        published with a rename (a copy already there is reused if its sizes still match)."""
        if (folder / MANIFEST).is_file():
            try:
                self._verify_files(manifest.model_copy(update={"path": str(folder)}), deep=False)
                return
            except CorruptArtifactError:
                _remove_tree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.download-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            files = [f.path for f in manifest.files]
            self.remote.download(manifest.stage, manifest.fingerprint, manifest.attempt or "", files, tmp)
            self._verify_files(manifest.model_copy(update={"path": str(tmp)}), deep=True)
            (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
            _fsync_tree(tmp)
            _make_read_only(tmp)
            try:
                os.rename(tmp, folder)
            except OSError:  # another process materialized it first
                _remove_tree(tmp)
        except BaseException:
            _remove_tree(tmp)
            raise

    def _verify_files(self, manifest: Manifest, deep: bool) -> None:
        base = Path(manifest.path)
        for entry in manifest.files:
            path = base / entry.path
            if not path.is_file():
                raise CorruptArtifactError(f"{manifest.stage} artifact {manifest.fingerprint}: missing {path}")
            if path.stat().st_size != entry.bytes:
                raise CorruptArtifactError(
                    f"{manifest.stage} artifact {manifest.fingerprint}: {path} has {path.stat().st_size} "
                    f"bytes, manifest says {entry.bytes}"
                )
            if deep and file_sha256(path) != entry.sha256:
                raise CorruptArtifactError(
                    f"{manifest.stage} artifact {manifest.fingerprint}: {path} does not match its SHA-256"
                )

    def _quarantine(self, folder: Path) -> Path | str:
        if self.remote is not None:  # un-commit: the manifest moves aside, the attempt folder stays for inspection
            stage, fp = folder.parent.name, folder.name
            _remove_tree(folder)
            return self.remote.uncommit(stage, fp, MANIFEST, f"corrupt-{int(time.time())}")
        target = folder.with_name(f".{folder.name}.corrupt-{int(time.time())}")
        os.rename(folder, target)
        return target

    def _remove_stale_temporaries(self, stage: str, fp: str) -> None:
        stage_dir = self.root / stage
        if not stage_dir.exists():
            return
        for tmp in [*stage_dir.glob(f".{fp}.tmp-*"), *stage_dir.glob(f".{fp}.download-*")]:  # download: remote roots
            pid = int(tmp.name.rsplit("-", 2)[1])
            if not pid_alive(pid) or pid == os.getpid():
                shutil.rmtree(tmp, ignore_errors=True)

    def build(
        self,
        key: StageKey,
        produce: Callable[[StageContext], dict[str, Any]],
        *,
        run_id: str | None = None,
        force: bool = False,
        log: Callable[[str], None] = print,
        progress: Callable[[float, str], None] | None = None,
    ) -> tuple[Manifest, bool]:
        """Return the artifact ``key`` names, producing it unless it already exists.

        Returns ``(manifest, reused)``. An existing artifact that fails verification is quarantined and
        rebuilt. ``produce`` writes its files into ``ctx.out_dir`` and returns the counts for the manifest.
        """
        fp = key.fingerprint
        with self._build_lock(key.stage, fp, log):
            return self._build_locked(key, fp, produce, run_id, force, log, progress)

    @contextmanager
    def _build_lock(self, stage: str, fp: str, log: Callable[[str], None]) -> Iterator[None]:
        """One builder per fingerprint across processes on this machine: a second one waits, then reuses.

        An ``flock`` dies with its process, so a killed build never leaves a stale lock behind.
        """
        lock_path = self.root / ".locks" / f"{stage}-{fp}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f"{stage} {fp}: another process is building it; waiting")
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _build_locked(
        self,
        key: StageKey,
        fp: str,
        produce: Callable[[StageContext], dict[str, Any]],
        run_id: str | None,
        force: bool,
        log: Callable[[str], None],
        progress: Callable[[float, str], None] | None,
    ) -> tuple[Manifest, bool]:
        stage = key.stage
        final = self.artifact_dir(stage, fp)
        existing = self.load(stage, fp)
        if existing is not None and not force:
            try:
                self.verify(existing)
                return existing, True
            except CorruptArtifactError as err:
                moved = self._quarantine(final)
                log(f"{err}; moved it to {moved} and rebuilding")
        elif existing is not None and force:
            self._quarantine(final)

        self._remove_stale_temporaries(stage, fp)
        tmp = final.parent / f".{fp}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        work = self.work_dir(stage, fp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        target = self._publish_target(stage, fp)
        try:
            attempt_uri = f"{target['uri']}/{target['attempt']}" if target else None
            ctx = StageContext(out_dir=tmp, work_dir=work, log=log, attempt_uri=attempt_uri)
            if progress is not None:
                ctx.progress = progress
            counts = produce(ctx)
            staged = [
                FileEntry(path=str(p.relative_to(tmp)), bytes=p.stat().st_size, sha256=file_sha256(p))
                for p in sorted(tmp.rglob("*"))
                if p.is_file()
            ]
            files = sorted(staged + ctx.uploaded, key=lambda f: f.path)
            manifest = Manifest(
                stage=stage,
                version=key.version,
                fingerprint=fp,
                params=key.params,
                inputs=key.inputs,
                files=files,
                content_hash=content_hash_of(files),
                counts=counts,
                path=str(final),
                created_at=datetime.now(UTC).isoformat(),
                elapsed_s=round(time.perf_counter() - started, 3),
                run_id=run_id,
                **target,
            )
            (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
            _fsync_tree(tmp)
            if self.remote is not None:
                winner = self._publish_remote(tmp, manifest, staged, complete_copy=not ctx.uploaded)
                if winner is not None:
                    return winner, True
                shutil.rmtree(work, ignore_errors=True)
                return manifest, False
            try:
                os.rename(tmp, final)
            except OSError:
                # Another process published the same fingerprint first: identical content by construction.
                shutil.rmtree(tmp, ignore_errors=True)
                published = self.load(stage, fp)
                if published is None:
                    raise
                return published, True
            _fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if target:
                self._discard_unless_committed(stage, fp, target["attempt"])
            raise
        shutil.rmtree(work, ignore_errors=True)
        return manifest, False

    def remove_orphaned_attempts(self, min_age_s: float = 86400) -> list[str]:
        """Delete attempt folders no committed manifest names, older than ``min_age_s``; return their URIs.

        They are what killed or losing publishers leave on a remote root; no reader ever looks at them. The age
        (from the folder's name) keeps attempts that may still be uploading; a local root has none.
        """
        if self.remote is None:
            return []
        removed, committed = [], {}
        now = datetime.now(UTC)
        for stage, fp, attempt in self.remote.attempts():
            if (stage, fp) not in committed:
                manifest = self.load(stage, fp)
                committed[stage, fp] = manifest.attempt if manifest else None
            started = datetime.strptime(attempt[len(ATTEMPT_PREFIX) :].split("-")[0], ATTEMPT_TIME).replace(tzinfo=UTC)
            if attempt != committed[stage, fp] and (now - started).total_seconds() >= min_age_s:
                self.remote.discard(stage, fp, attempt)
                removed.append(f"{self.remote.artifact_uri(stage, fp)}/{attempt}")
        return removed

    def _publish_target(self, stage: str, fp: str) -> dict[str, str]:
        """A remote root's URI and a fresh, sortable attempt folder name for a new artifact (none when local)."""
        if self.remote is None:
            return {}
        attempt = f"{ATTEMPT_PREFIX}{datetime.now(UTC):{ATTEMPT_TIME}}-{uuid.uuid4().hex[:8]}"
        return {"uri": self.remote.artifact_uri(stage, fp), "attempt": attempt}

    def _discard_unless_committed(self, stage: str, fp: str, attempt: str) -> None:
        """Best effort after a failed build or publish: delete the attempt's uploads (the build's own or its parts'),
        unless the manifest naming them was committed after all (a commit whose reply was lost) or that cannot be
        checked. A killed process leaves its uploads behind; no reader looks at them (``remove_orphaned_attempts``)."""
        with suppress(Exception):  # cleanup must not hide the error that got us here
            text = self.remote.read_manifest(stage, fp, MANIFEST)
            if text is None or Manifest.model_validate_json(text).attempt != attempt:
                self.remote.discard(stage, fp, attempt)

    def _publish_remote(
        self, tmp: Path, manifest: Manifest, staged: list[FileEntry], complete_copy: bool = True
    ) -> Manifest | None:
        """Upload the staged files (parts may have uploaded others already), commit the manifest last, and keep
        the staging folder as the local copy when it holds every file (else a reader downloads it on first use).

        Returns None when this call published it, or the winner's manifest when another publisher committed
        the same fingerprint first (this attempt's uploads are then deleted).
        """
        stage, fp, attempt = manifest.stage, manifest.fingerprint, manifest.attempt or ""
        published = manifest.model_copy(update={"path": manifest.uri})
        try:
            self.remote.upload(tmp, stage, fp, attempt, [f.path for f in staged])
            maybe_fail(stage, "publish")  # tests: files uploaded, manifest not committed
            committed = self.remote.commit(stage, fp, MANIFEST, published.model_dump_json(indent=2))
        except BaseException:
            self._discard_unless_committed(stage, fp, attempt)
            raise
        if not committed:
            self.remote.discard(stage, fp, attempt)
            _remove_tree(tmp)
            winner = self.load(stage, fp)
            if winner is None:
                raise RuntimeError(f"{stage} {fp}: the manifest at {manifest.uri} vanished while publishing")
            return winner
        final = Path(manifest.path)
        if final.exists():  # a stale local copy (the remote manifest was deleted or quarantined)
            _remove_tree(final)
        if not complete_copy:
            _remove_tree(tmp)
            return None
        _make_read_only(tmp)
        os.rename(tmp, final)
        return None
