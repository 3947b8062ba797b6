"""Fault injection for tests: make a named stage fail (or die) a few times, at a named point.

``TOKENMILL_FAULT="<stage>:<point>[:kill][:<times>]"`` makes ``maybe_fail(stage, point)`` raise (or SIGKILL the
process) the first ``times`` times it is reached (default once); a counter file in ``TOKENMILL_FAULT_DIR``
(default: the temp dir) keeps count across processes, so a later retry or rerun succeeds. ``times=2`` defeats
a task's single automatic retry, which is what makes the whole flow run fail.

``TOKENMILL_FAULT="@/path/to/file"`` reads the spec from that file each time (no file or an empty one means no
fault): a long-running served process can then be armed and disarmed without restarting it.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path


class InjectedFault(RuntimeError):
    """Raised by an injected fault."""


def _spec() -> str:
    spec = os.environ.get("TOKENMILL_FAULT", "")
    if spec.startswith("@"):
        path = Path(spec[1:])
        return path.read_text().strip() if path.is_file() else ""
    return spec


def _fired(marker: Path) -> int:
    """How often the fault has fired: the count after the spec in the marker (a bare spec, older format, is 1)."""
    if not marker.exists():
        return 0
    last = marker.read_text().rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 1


def maybe_fail(stage: str, point: str = "start") -> None:
    spec = _spec()
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != stage or (len(parts) > 1 and parts[1] != point):
        return
    options = parts[2:]
    times = next((int(p) for p in options if p.isdigit()), 1)
    marker = Path(os.environ.get("TOKENMILL_FAULT_DIR", tempfile.gettempdir())) / f"tokenmill-fault-{stage}-{point}"
    fired = _fired(marker)
    if fired >= times:
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{spec} {fired + 1}")
    if "kill" in options:
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"injected fault {fired + 1}/{times} in stage {stage!r} at {point!r} (TOKENMILL_FAULT={spec})")
