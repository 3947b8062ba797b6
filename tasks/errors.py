"""Errors a user can act on, typed, so the CLI and the flows tell them from bugs.

``UserError`` carries a one-line message that names the file or field and says what to do; the CLI prints it
and exits 2, with no traceback. ``NotRetryable`` marks any error a retry cannot fix (bad input, a bad
setting): Prefect's retry condition and the torchrun launcher honour it.
"""

from __future__ import annotations


class NotRetryable(Exception):  # noqa: N818 (a marker, mixed into concrete errors)
    """Mixin: retrying the same stage with the same inputs fails the same way."""


class UserError(NotRetryable, ValueError):
    """Bad input or settings, explained in one line (file, field, what to do)."""


def is_retryable(err: BaseException) -> bool:
    """Whether a retry of the failed stage could succeed (transient I/O, a killed worker), as opposed to bad input."""
    return not isinstance(err, NotRetryable) and getattr(err, "retryable", True)
