"""A run's lineage bookkeeping — start, each stage's outcome, finish — written once for every runner.

``run_all`` (no Prefect) and the ``pipeline`` flow both record through it, so a run looks the same in lineage
whichever ran it, and the configuration snapshot is taken in one place.
"""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from storage.artifacts import Manifest
from storage.lineage import LineageStore
from tasks.config import PipelineConfig


def error_text(err: BaseException) -> str:
    """The one-line form of a stage's error that lineage records (type and message, no traceback)."""
    return "".join(traceback.format_exception_only(err)).strip()


def interruption(err: BaseException) -> str:
    """How a run was interrupted, for lineage: the signal's name when one is known."""
    signum = getattr(err, "signal", None) or (err.args[0] if err.args and isinstance(err.args[0], int) else None)
    if isinstance(err, KeyboardInterrupt):
        return "SIGINT"
    try:
        return signal.Signals(signum).name if signum else type(err).__name__
    except ValueError:
        return type(err).__name__


@dataclass
class RunRecorder:
    """Records one lineage run; the flow process (the single DuckDB writer) holds it."""

    lineage: LineageStore
    run_id: str
    backup: Callable[[str], object] | None = None  # remote roots: snapshot the lineage file after the run

    def _backup(self) -> None:
        """Snapshot lineage next to the artifacts; a failure warns (the run's own outcome is already recorded)."""
        if self.backup is None:
            return
        try:
            self.backup(self.run_id)
        except Exception as err:  # noqa: BLE001 - a lost snapshot must not turn a run's result into an error
            print(f"warning: lineage snapshot not uploaded ({error_text(err)}); the next run retries", file=sys.stderr)

    def start(self, cfg: PipelineConfig, flow_run_id: str | None = None) -> None:
        """Record the run as started, with its configuration snapshot — credentials redacted (``tasks.config``)."""
        self.lineage.start_run(self.run_id, cfg.name, cfg.model_dump(mode="json"), cfg.seed, flow_run_id)

    def stage_done(self, stage: str, started: datetime, manifest: Manifest, reused: bool) -> None:
        self.lineage.record_stage(self.run_id, stage, "cached" if reused else "completed", started, manifest=manifest)

    def stage_failed(self, stage: str, started: datetime, err: BaseException) -> None:
        """Record the failed stage and end the run with the stage's error: ``failed``, or ``cancelled`` when it
        was interrupted (Ctrl-C, SIGTERM: not an ``Exception``). Artifacts and checkpoints stay for a rerun."""
        status = "failed" if isinstance(err, Exception) else "cancelled"
        error = error_text(err) if status == "failed" else f"interrupted ({interruption(err)})"
        self.lineage.record_stage(self.run_id, stage, status, started, error=error)
        self.lineage.finish_run(self.run_id, status, f"{stage}: {error}")
        self._backup()

    def finish(self) -> None:
        self.lineage.finish_run(self.run_id, "completed")
        self._backup()
