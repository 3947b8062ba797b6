"""The contract every stage implements: what its producing function receives and the result it returns.

``produce(run: StageRun) -> StageResult``. ``DocCounts`` is the one place document counts are assembled and
conservation (in = kept + dropped, per reason) is checked; ``StageResult.as_counts()`` is what the manifest
and lineage record.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from storage.artifacts import Manifest, StageContext
from tasks.config import PipelineConfig


@dataclass(frozen=True)
class StageRun:
    """What a stage's producing function gets: the configuration, its input manifests, where to write."""

    cfg: PipelineConfig
    inputs: dict[str, Manifest]
    ctx: StageContext


@dataclass(frozen=True)
class DocCounts:
    """Documents in, kept, and dropped per reason; refuses counts that do not add up."""

    docs_in: int
    kept: int
    dropped: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lost = self.docs_in - self.kept - sum(self.dropped.values())
        if lost:
            raise RuntimeError(
                f"document counts are not conserved: {self.docs_in} in, {self.kept} kept, "
                f"{sum(self.dropped.values())} dropped ({lost:+d} unaccounted) — a bug in the stage"
            )
        object.__setattr__(self, "dropped", dict(sorted(self.dropped.items())))

    @classmethod
    def total(cls, parts: Iterable[DocCounts]) -> DocCounts:
        """The sum of several parts' counts."""
        docs_in = kept = 0
        dropped: Counter[str] = Counter()
        for part in parts:
            docs_in, kept = docs_in + part.docs_in, kept + part.kept
            dropped.update(part.dropped)
        return cls(docs_in, kept, dropped)

    def as_dict(self) -> dict[str, Any]:
        return {"docs_in": self.docs_in, "kept": self.kept, "dropped": dict(self.dropped)}


@dataclass(frozen=True)
class StageResult:
    """A stage's outcome: its document counts (data stages) and any other numbers it reports."""

    docs: DocCounts | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def as_counts(self) -> dict[str, Any]:
        """The manifest's ``counts``: document counts first, then the stage's own numbers."""
        return (self.docs.as_dict() if self.docs else {}) | dict(self.extra)

    def __getitem__(self, key: str) -> Any:
        """Read it like the manifest's counts (``result["kept"]``)."""
        return self.as_counts()[key]
