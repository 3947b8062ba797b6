"""The earlier index an incremental dedup run matches new documents against (``dedup.against``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.artifacts import ArtifactStore, Manifest
from tasks.data.minhash import (
    NORMALIZATION_VERSION,
    MinHashParams,
)
from tasks.errors import UserError


@dataclass(frozen=True)
class PreviousIndex:
    """The index inside an earlier dedup artifact: its kept corpus's exact and band hashes, and text holders."""

    artifact: Path

    @property
    def folder(self) -> Path:
        return self.artifact / "index"

    @property
    def exact_files(self) -> list[Path]:
        return sorted(self.folder.glob("exact-*.parquet"))

    @property
    def band_files(self) -> list[Path]:
        return sorted(self.folder.glob("bands-*.parquet"))

    def meta(self) -> dict[str, Any]:
        return json.loads((self.folder / "index.json").read_text())

    def holders(self) -> list[Path]:
        """Artifacts holding the indexed texts, by ``holder`` number ('.' is the artifact holding the index)."""
        return [(self.artifact / rel).resolve() for rel in self.meta()["holders"]]

    def check_compatible(self, params: MinHashParams) -> None:
        meta = self.meta()
        want = index_signature(params)
        if meta["minhash"] != want:
            raise ValueError(
                f"dedup.against: the index in {self.artifact} was built with {meta['minhash']}, this run uses "
                f"{want}; band hashes are only comparable with identical settings (or drop dedup.against)"
            )


def index_signature(params: MinHashParams) -> dict[str, Any]:
    """The settings band hashes depend on (``fold_numbers`` only when off, so older indexes stay comparable)."""
    signature = {
        "ngram": params.ngram,
        "permutations": params.permutations,
        "bands": params.bands,
        "rows": params.rows,
        "seed": params.seed,
        "normalization": NORMALIZATION_VERSION,
    }
    return signature if params.fold_numbers else signature | {"fold_numbers": False}


def resolve_previous(against: str | None, root: str | Path) -> Manifest | None:
    """The earlier dedup artifact named by ``dedup.against``: a path, or 'latest' (newest in this root)."""
    if against is None:
        return None
    if against == "latest":
        store = ArtifactStore(root)
        found = [m for m in store.published("dedup") if has_index(m)]
        if not found:
            return None
        latest = max(found, key=lambda m: m.created_at)
        store.materialize(latest)  # an object-store root: a verified local copy
        return latest
    try:
        _, manifest = ArtifactStore.of_artifact(against)
    except FileNotFoundError:
        manifest = None
    if manifest is None or manifest.stage != "dedup" or not has_index(manifest):
        raise UserError(f"dedup.against: {against} is not a dedup artifact with an index (no manifest.json/index/)")
    return manifest


def has_index(manifest: Manifest) -> bool:
    return any(f.path == "index/index.json" for f in manifest.files)
