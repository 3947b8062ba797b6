"""Clean audit: what each rule would drop, before any commitment, on the ingested documents (or a sample).

Runs the clean stage's own batch function (``clean_batch``) in memory, nothing is published, and reports per
preset and rule: how many documents break the rule at all, how many it would drop (it is the first rule they
break), their bytes, the rule's statistic distribution against its threshold, and a few examples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tasks.config import CleanConfig
from tasks.data.clean import check_language_codes, clean_batch
from tasks.data.filters import Rule

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _broken(rule: dict, scores: dict[str, float]) -> bool:
    if rule["reason"] == "language:*":
        return scores.get("language.allowed_score", 1.0) < scores.get("language.min_score", 0.0)
    value = scores.get(rule["stat"])
    if value is None:
        return False
    return (rule["low"] is not None and value < rule["low"]) or (rule["high"] is not None and value > rule["high"])


def audit(doc_paths: list[Path], cfg: CleanConfig, limit: int | None = None, samples: int = 2) -> dict:
    """Per preset and rule: documents breaking it, documents and bytes it would drop, quantiles, examples."""
    check_language_codes(cfg)
    docs: list[dict] = []
    rules: dict[str, list[dict]] = {}
    for path in doc_paths:
        for batch in pq.ParquetFile(path).iter_batches(
            batch_size=512, columns=["doc_id", "source", "locator", "text", "n_bytes"]
        ):
            rows = batch.to_pylist()
            if limit is not None:
                rows = rows[: limit - len(docs)]
            out = clean_batch([r["text"] for r in rows], [r["source"] for r in rows], [r["locator"] for r in rows], cfg)
            for preset, held_to in out.rules.items():
                rules.setdefault(preset, [_rule_dict(r) for r in held_to])
            for r, reason, scores, text in zip(rows, out.reason, out.scores.to_pylist(), out.texts, strict=True):
                scores = dict(scores)
                preset = next(k.removeprefix("preset.") for k in scores if k.startswith("preset."))
                docs.append({"locator": r["locator"], "bytes": r["n_bytes"], "reason": reason, "preset": preset,
                             "scores": scores, "opening": " ".join(text[:200].split())})  # fmt: skip
            if limit is not None and len(docs) >= limit:
                break
        if limit is not None and len(docs) >= limit:
            break
    total_bytes = sum(d["bytes"] for d in docs)
    report = {
        "docs": len(docs),
        "bytes": total_bytes,
        "kept": sum(d["reason"] is None for d in docs),
        "bytes_kept": sum(d["bytes"] for d in docs if d["reason"] is None),
        "presets": {},
    }
    for preset, held_to in sorted(rules.items()):
        mine = [d for d in docs if d["preset"] == preset]
        entry = {"docs": len(mine), "bytes": sum(d["bytes"] for d in mine), "rules": []}
        for rule in held_to:
            first = [d for d in mine if _matches(d["reason"], rule["reason"])]
            values = np.array([d["scores"][rule["stat"]] for d in mine if rule["stat"] in d["scores"]])
            entry["rules"].append(
                rule
                | {
                    "breaks": sum(_broken(rule, d["scores"]) for d in mine),
                    "drops": len(first),
                    "bytes_dropped": sum(d["bytes"] for d in first),
                    "quantiles": dict(
                        zip(map(str, QUANTILES), np.quantile(values, QUANTILES).round(4).tolist(), strict=True)
                    )
                    if len(values)
                    else {},
                    "examples": [
                        {k: d[k] for k in ("locator", "bytes", "opening")} | {"score": d["scores"].get(rule["stat"])}
                        for d in first[:samples]
                    ],  # fmt: skip
                }
            )
        report["presets"][preset] = entry
    return report


def _matches(reason: str | None, rule_reason: str) -> bool:
    return reason is not None and (
        reason == rule_reason or (rule_reason == "language:*" and reason.startswith("language:"))
    )


def _rule_dict(rule: Rule) -> dict:
    return rule.threshold() | {"reason": rule.reason}
