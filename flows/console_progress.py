"""What ``tokenmill run`` shows while stages work: a live bar per stage on a terminal, plain lines otherwise.

On a terminal each stage gets a rich progress bar (its latest count — parts, steps, loss — as text, the
percentage, elapsed time and the estimated time left, from the rate so far). When the output is a file or a
pipe, a line per stage start and end, and at most one progress line per stage every ``PLAIN_EVERY_S`` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from flows.progress import StageEvent, listening

PLAIN_EVERY_S = 10.0


def _bars(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<9}"),
        BarColumn(bar_width=24),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
    )


@contextmanager
def stage_progress(console: Console) -> Iterator[None]:
    """Show this process's stage events on ``console`` while the block runs."""
    if console.is_terminal:
        with _bars(console) as bars, listening(_on_terminal(bars)):
            yield
    else:
        with listening(_on_plain(console)):
            yield


def _on_terminal(bars: Progress):
    tasks: dict[str, TaskID] = {}

    def on_event(event: StageEvent) -> None:
        if event.phase == "start" or event.stage not in tasks:
            tasks[event.stage] = bars.add_task(event.stage, total=1.0, note="running")
        task = tasks[event.stage]
        if event.phase == "done":
            bars.update(task, completed=1.0 if event.message != "failed" else event.fraction, note=event.message)
            bars.stop_task(task)
        else:
            bars.update(task, completed=min(max(event.fraction, 0.0), 1.0), note=event.message)

    return on_event


def _on_plain(console: Console):
    last: dict[str, float] = {}

    def on_event(event: StageEvent) -> None:
        now = time.monotonic()
        if event.phase == "progress" and now - last.get(event.stage, 0.0) < PLAIN_EVERY_S:
            return
        last[event.stage] = now
        detail = {"start": "started", "done": event.message}.get(
            event.phase, f"{100 * event.fraction:.0f}% {event.message}"
        )
        console.print(f"{event.stage}: {detail}", highlight=False, soft_wrap=True)

    return on_event
