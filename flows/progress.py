"""Stage progress as events: the flow reports each stage's start, progress and end; displays listen.

The pipeline publishes every event to Prefect (a progress artifact per stage run) and to the listeners of
this process, such as ``tokenmill run``'s progress bars (``flows.cli``). A listener must never fail a stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

Phase = Literal["start", "progress", "done"]


@dataclass(frozen=True)
class StageEvent:
    stage: str
    phase: Phase
    fraction: float = 0.0
    message: str = ""


Listener = Callable[[StageEvent], None]
_listeners: list[Listener] = []
_log = logging.getLogger(__name__)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send this process's stage events to ``listener`` for the duration of the block."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def publish(event: StageEvent) -> None:
    for listener in list(_listeners):
        try:
            listener(event)
        except Exception as err:  # noqa: BLE001 - a display must never fail the stage
            _log.warning("progress display failed: %s", err)
