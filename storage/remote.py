"""Artifact roots on object storage (``s3://``, ``gs://``, any fsspec URI): upload, then commit with the manifest.

An object store has no rename, so a remote root publishes in two steps: every file of the artifact is uploaded
under a fresh attempt folder ``<root>/<stage>/<fingerprint>/<attempt>/``, then ``manifest.json`` is written
next to it, last, and only if it does not exist yet (a conditional put, ``If-None-Match: *``). An artifact
exists iff its manifest exists and readers find its files only through the manifest, so an interrupted upload
is never seen, and of two publishers of the same fingerprint the second loses cleanly: it deletes its own
attempt folder and reuses the winner's artifact.

Stages keep reading and writing local files. Each remote root has a local mirror,
``$TOKENMILL_HOME/roots/<scheme>/<bucket>/<prefix>/`` (``TOKENMILL_HOME`` defaults to ``~/.tokenmill``), laid
out like a local root: staging and work folders, the verified read-only copies of the artifacts a stage reads
(``<stage>/<fingerprint>/``, downloaded once), build locks, the ingest cache, Prefect results, run reports and
the lineage DuckDB file (DuckDB needs a local file to write). Credentials come from the environment
(``AWS_*``, instance roles) like for any fsspec client; nothing about them is written to manifests or lineage.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOCAL_PROTOCOLS = ("", "file", "local")
ATTEMPT_PREFIX = "attempt-"
ATTEMPT_TIME = "%Y%m%dT%H%M%S"


def protocol_of(root: str | Path) -> str:
    text = str(root)
    return text.split("://", 1)[0] if "://" in text else ""


def is_remote(root: str | Path) -> bool:
    """Whether ``root`` names an fsspec file system other than the local one (``s3://bucket/prefix``...)."""
    return protocol_of(root) not in LOCAL_PROTOCOLS


def local_path(root: str | Path) -> Path:
    """A local root as a path (``file://`` URIs included)."""
    text = str(root)
    return Path(text.split("://", 1)[1] if protocol_of(text) in ("file", "local") else text)


def tokenmill_home() -> Path:
    return Path(os.environ.get("TOKENMILL_HOME") or "~/.tokenmill").expanduser()


def local_mirror(uri: str) -> Path:
    """The local folder that stands in for remote root ``uri`` on this machine (staging, copies, lineage)."""
    protocol, rest = uri.split("://", 1)
    parts = [p for p in rest.split("/") if p not in ("", ".", "..")]
    if not parts:
        raise ValueError(f"root {uri!r} names no bucket")
    return tokenmill_home().joinpath("roots", protocol, *parts)


class RemoteRoot:
    """The object-store side of an artifact root: where artifacts are published and read from."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        import fsspec

        self.uri = uri.rstrip("/")
        try:
            # No listings cache: what is committed changes under us (other machines publish and collect).
            options = {"use_listings_cache": False} | (storage_options or {})
            self.fs, self._base = fsspec.core.url_to_fs(self.uri, **options)
        except ImportError as err:
            raise ImportError(
                f"root {self.uri!r} needs the fsspec driver for {protocol_of(uri)}:// "
                f"(for s3://: pip install 'tokenmill[s3]'): {err}"
            ) from err
        self._base = self._base.rstrip("/")

    def object_key(self, *parts: str) -> str:
        """The file system key of ``<root>/<parts...>``."""
        return "/".join([self._base, *parts])

    def artifact_uri(self, stage: str, fp: str) -> str:
        return f"{self.uri}/{stage}/{fp}"

    def _key(self, stage: str, fp: str, *parts: str) -> str:
        return "/".join([self._base, stage, fp, *parts])

    def read_manifest(self, stage: str, fp: str, name: str) -> str | None:
        """The committed manifest's JSON text, or None when the artifact does not exist (not yet committed)."""
        try:
            return self.fs.cat_file(self._key(stage, fp, name)).decode()
        except FileNotFoundError:
            return None

    def committed(self, stage: str, name: str) -> list[str]:
        """The fingerprints of a stage that have a committed manifest (one listing)."""
        prefix = f"{self._base}/{stage}/"
        found = self.fs.glob(f"{prefix}*/{name}")
        return sorted(p[len(prefix) :].split("/", 1)[0] for p in found if p.startswith(prefix))

    def upload(self, folder: Path, stage: str, fp: str, attempt: str, files: Iterable[str]) -> None:
        """Upload ``folder``'s ``files`` (relative paths) under the attempt folder, concurrently where supported."""
        files = list(files)
        if files:
            self.fs.put(
                [str(folder / f) for f in files], [self._key(stage, fp, attempt, f) for f in files], recursive=False
            )

    def commit(self, stage: str, fp: str, name: str, manifest_json: str) -> bool:
        """Write the manifest unless one exists: True if this call committed the artifact, False if another did.

        Uses an exclusive create (``If-None-Match: *`` on S3). File systems without one fall back to check-then-
        write, which leaves a short race between two publishers of the same fingerprint on different machines.
        """
        key = self._key(stage, fp, name)
        data = manifest_json.encode()
        try:
            self.fs.pipe_file(key, data, mode="create")
            return True
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError):
            if self.fs.exists(key):
                return False
            self.fs.pipe_file(key, data)
            return True

    def attempts(self, stage: str | None = None) -> list[tuple[str, str, str]]:
        """Every attempt folder in the root (or of one stage), as ``(stage, fingerprint, attempt)`` (one listing)."""
        pattern = f"{self._base}/{stage or '*'}/*/{ATTEMPT_PREFIX}*"
        found = self.fs.glob(pattern)
        return sorted(tuple(p[len(self._base) + 1 :].split("/")[:3]) for p in found)

    def discard(self, stage: str, fp: str, attempt: str) -> None:
        """Delete an attempt folder (a publisher that lost the race, or a failed upload)."""
        key = self._key(stage, fp, attempt)
        if self.fs.exists(key):
            self.fs.rm(key, recursive=True)

    def uncommit(self, stage: str, fp: str, name: str, suffix: str) -> str:
        """Move a committed manifest aside (``<name>.<suffix>``): the artifact stops existing and will be rebuilt."""
        key, aside = self._key(stage, fp, name), self._key(stage, fp, f"{name}.{suffix}")
        self.fs.copy(key, aside)
        self.fs.rm(key)
        return f"{self.uri}/{stage}/{fp}/{name}.{suffix}"

    def problems(self, stage: str, fp: str, attempt: str, sizes: dict[str, int]) -> list[str]:
        """Files of a committed artifact that are missing remotely or have another size (one listing)."""
        prefix = self._key(stage, fp, attempt) + "/"
        try:
            found = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            found = {}
        listed = {name[len(prefix) :]: info.get("size") for name, info in found.items() if name.startswith(prefix)}
        where = f"{self.uri}/{stage}/{fp}/{attempt}"
        out = []
        for rel, size in sizes.items():
            if rel not in listed:
                out.append(f"missing {where}/{rel}")
            elif listed[rel] != size:
                out.append(f"{where}/{rel} has {listed[rel]} bytes, manifest says {size}")
        return out

    def download(self, stage: str, fp: str, attempt: str, files: Iterable[str], dest: Path) -> None:
        """Copy the artifact's ``files`` into ``dest`` (which must exist), concurrently where supported."""
        files = list(files)
        for f in files:
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
        if files:
            self.fs.get([self._key(stage, fp, attempt, f) for f in files], [str(dest / f) for f in files])


# --- parts that read and write the object store themselves (workers that share nothing but the root) ------


def object_fs(uri: str) -> tuple[Any, str]:
    """The file system and key of an object URI (credentials and endpoint from the environment)."""
    import fsspec

    return fsspec.core.url_to_fs(uri, use_listings_cache=False)


def open_input(path: str | Path) -> Any:
    """A local path as is, or an object URI opened for (ranged) reading: what ``pyarrow.parquet`` accepts."""
    if not is_remote(path):
        return path
    fs, key = object_fs(str(path))
    return fs.open(key, "rb")


@contextmanager
def opened_input(path: str | Path) -> Iterator[Any]:
    """``open_input`` for a block: an object opened for reading is closed afterwards."""
    source = open_input(path)
    try:
        yield source
    finally:
        if source is not path:
            source.close()


def put_files(folder: Path, uri: str, names: Iterable[str]) -> None:
    """Upload ``folder``'s files (relative names) under ``uri``."""
    names = list(names)
    if names:
        fs, key = object_fs(uri)
        fs.put([str(folder / n) for n in names], [f"{key}/{n}" for n in names], recursive=False)


def copy_object(src: str, dst: str) -> None:
    """Copy one object within the store (server-side on S3: no bytes pass through this process)."""
    fs, src_key = object_fs(src)
    fs.copy(src_key, object_fs(dst)[1])


def register_object_fs(con: Any, locations: Iterable[str | Path]) -> None:
    """Let a DuckDB connection read object URIs among ``locations`` (through fsspec; no httpfs extension)."""
    remote = next((str(x) for x in locations if is_remote(x)), None)
    if remote is not None:
        con.register_filesystem(object_fs(remote)[0])


def remove_prefix(uri: str) -> None:
    fs, key = object_fs(uri)
    if fs.exists(key):
        fs.rm(key, recursive=True)
