"""Fault injection for tests: make a named stage fail (or die) once, at a named point.

``TOKENMILL_FAULT="<stage>:<point>[:kill]"`` makes ``maybe_fail(stage, point)`` raise (or SIGKILL the process)
the first time it is reached; a marker file in ``TOKENMILL_FAULT_DIR`` (default: the temp dir) makes it
fire once, so the retry or rerun succeeds.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path


class InjectedFault(RuntimeError):
    """Raised by an injected fault."""


def maybe_fail(stage: str, point: str = "start") -> None:
    spec = os.environ.get("TOKENMILL_FAULT")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != stage or (len(parts) > 1 and parts[1] != point):
        return
    marker = Path(os.environ.get("TOKENMILL_FAULT_DIR", tempfile.gettempdir())) / f"tokenmill-fault-{stage}-{point}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(spec)
    if len(parts) > 2 and parts[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"injected fault in stage {stage!r} at {point!r} (TOKENMILL_FAULT={spec})")
