"""Precision and recall of clean's PII redaction on the labelled sample in ``benchmarks/pii_sample.py``.

A redaction is correct when it replaces an e-mail address or a public IPv4 address the row holds; precision is
correct / redacted, recall is correct / held. ``--rule dotted-quad`` measures the plain dotted-quad rule (what
clean did before version numbers were recognised) next to the current one.

    python benchmarks/pii_precision.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.pii_sample import EMAIL_ROWS, IP_ROWS  # noqa: E402
from tasks.config import PiiConfig  # noqa: E402
from tasks.data import clean  # noqa: E402


def measure(rows: list[tuple[str, int]], count) -> dict:
    tp = fp = fn = 0
    wrong = []
    for text, held in rows:
        found = count(text)
        tp += min(found, held)
        fp += max(found - held, 0)
        fn += max(held - found, 0)
        if found != held:
            wrong.append(text)
    return {
        "rows": len(rows),
        "held": sum(h for _, h in rows),
        "redacted": tp + fp,
        "precision": round(tp / (tp + fp), 4) if tp + fp else 1.0,
        "recall": round(tp / (tp + fn), 4) if tp + fn else 1.0,
        "wrong": wrong,
    }


def main() -> None:
    cfg = PiiConfig()
    ips = measure(IP_ROWS, lambda t: clean.redact_pii(t, cfg)[2])
    dotted = measure(IP_ROWS, lambda t: sum(clean.is_public_ipv4(m.group(0)) for m in clean._IPV4.finditer(t)))
    emails = measure(EMAIL_ROWS, lambda t: clean.redact_pii(t, cfg)[1])
    print(json.dumps({"ipv4": ips, "ipv4_dotted_quad_rule": dotted, "email": emails}, indent=1))


if __name__ == "__main__":
    main()
