"""Where a stage's parts write, on a local root or on an object-store root shared with nothing else.

On a local root a part writes straight into the stage's staging folder (``ctx.out_dir``) or work folder. On an
object-store root (``ctx.attempt_uri`` set) a worker may share nothing with the flow process but the store:
the part writes into a scratch folder of its own, uploads the files itself and reports each one's size and
SHA-256, so the flow process lists them in the manifest (``StageContext.uploaded``) without reading them. Files
a part hands back to the flow process (ledger fragments, per-part spans) go under the attempt folder's
``.parts/`` prefix, which the flow process deletes before it commits.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from storage.artifacts import FileEntry
from storage.hashing import file_sha256
from storage.remote import is_remote, object_fs, put_files

PARTS_PREFIX = ".parts"


@contextmanager
def part_folder(out: str, prefix: str = "part-") -> Iterator[Path]:
    """The folder a part writes into: ``out`` itself when local, else a fresh scratch folder of this process
    (removed afterwards, uploaded or not)."""
    if not is_remote(out):
        Path(out).mkdir(parents=True, exist_ok=True)
        yield Path(out)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
        yield Path(scratch)


def files_in(folder: Path, under: str = "") -> list[str]:
    """The files below ``folder / under``, as sorted paths relative to ``folder``."""
    base = folder / under
    return sorted(str(p.relative_to(folder)) for p in base.rglob("*") if p.is_file()) if base.is_dir() else []


def upload_part_files(folder: Path, uri: str, names: Iterable[str]) -> list[FileEntry]:
    """Hash ``folder``'s files ``names`` (relative paths), upload them under ``uri`` and return their entries."""
    names = list(names)
    entries = [FileEntry(path=n, bytes=(folder / n).stat().st_size, sha256=file_sha256(folder / n)) for n in names]
    put_files(folder, uri, names)
    return entries


def fetch_part_files(uri: str, entries: Iterable[FileEntry], dest: Path) -> None:
    """Download the files a part uploaded under ``uri`` into ``dest``, each checked against its SHA-256."""
    entries = list(entries)
    if not entries:
        return
    fs, key = object_fs(uri)
    for entry in entries:
        (dest / entry.path).parent.mkdir(parents=True, exist_ok=True)
    fs.get([f"{key}/{e.path}" for e in entries], [str(dest / e.path) for e in entries])
    for entry in entries:
        if file_sha256(dest / entry.path) != entry.sha256:
            raise RuntimeError(f"{uri}/{entry.path} does not match the SHA-256 its part reported")
