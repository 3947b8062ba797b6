"""Credentials out of anything persisted or printed: configuration snapshots, manifests, events, messages.

The one rule for what counts as a secret, used by the configuration's serializers (``tasks.config``) and by
readers of older records (lineage ``show``, the OpenLineage export).
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"
_SECRET_KEY = re.compile(r"key|secret|token|passw|credential|auth|session|signature", re.IGNORECASE)
_URI_USERINFO = re.compile(r"(?<=://)[^/@\s]+(?=@)")


def without_placeholders(value: Any) -> Any:
    """``value`` without the entries ``redact`` replaced (at any depth)."""
    if isinstance(value, dict):
        return {k: without_placeholders(v) for k, v in value.items() if v != REDACTED}
    return value


def redact(value: Any, key: str = "") -> Any:
    """``value`` with credentials replaced by ``<redacted>``: values under secret-looking keys (access keys,
    tokens, passwords) at any depth, and the ``user:password@`` part of URIs. Used wherever a configuration is
    persisted or printed (lineage, manifests, Prefect parameters, events, error messages)."""
    if _SECRET_KEY.search(key) and value is not None:
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _URI_USERINFO.sub(REDACTED, value)
    return value


def redact_config(config: dict[str, Any]) -> dict[str, Any]:
    """A pipeline configuration snapshot with its sources' credentials redacted (``storage_options`` by key,
    URIs' ``user:password@``); the rest is left alone (``tokenizer`` is a section, not a token)."""
    sources = [
        source | {"path": redact(source.get("path")), "storage_options": redact(source.get("storage_options") or {})}
        if isinstance(source, dict)
        else source
        for source in config.get("sources") or []
    ]
    return config | {"sources": sources} if "sources" in config else config
