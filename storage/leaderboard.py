"""A sweep's leaderboard: completed trials by objective (lower is better), then pruned, then failed (pure data)."""

from __future__ import annotations

import math
from typing import Any

STATUS_ORDER = {"completed": 0, "pruned": 1, "failed": 2}


def ranked(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials in leaderboard order, each with its ``rank`` (1 = best; only completed trials are ranked)."""

    def key(t: dict[str, Any]) -> tuple:
        value = t.get("objective")
        return STATUS_ORDER.get(t["status"], 3), value if value is not None else math.inf, t["trial"]

    out = []
    for position, trial in enumerate(sorted(trials, key=key), 1):
        out.append(trial | {"rank": position if trial["status"] == "completed" else None})
    return out


def best(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed trial with the lowest objective (ties: the earlier trial)."""
    top = ranked(trials)
    return top[0] if top and top[0]["rank"] == 1 else None


def leaderboard_rows(trials: list[dict[str, Any]], objective: str) -> list[dict[str, Any]]:
    """Flat rows for tables (CLI, Prefect table artifact, report): rank, trial, status, numbers, parameters."""
    rows = []
    for t in ranked(trials):
        rows.append(
            {
                "rank": t["rank"],
                "trial": t["trial"],
                "status": t["status"] + (f" @ step {t['stopped_at_step']}" if t.get("stopped_at_step") else ""),
                objective: t.get("objective"),
                "val_loss": t.get("val_loss"),
                "eval_docs": t.get("eval_docs"),
                "eval_docs_in_train": t.get("eval_docs_in_train"),
                "attempts": t.get("attempts"),
                **(t.get("params") or {}),
                "selected": bool(t.get("selected")),
            }
        )
    return rows
