"""The one place that decides how tokenmill hashes files, texts, identities and stage fingerprints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, BinaryIO

import xxhash

CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stream_hash(fh: BinaryIO) -> str:
    """128-bit hash of a binary stream's bytes (xxh3, read in 1 MiB chunks): cheap change detection of inputs."""
    digest = xxhash.xxh3_128()
    while chunk := fh.read(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def text_hash(text: str) -> str:
    """128-bit content hash of a (normalized) text, as 32 hex digits."""
    return xxhash.xxh3_128_hexdigest(text.encode("utf-8", "surrogatepass"))


def stable_id(*parts: str) -> str:
    """A 64-bit id from string parts, as 16 hex digits; stable across runs and machines."""
    return xxhash.xxh3_64_hexdigest("\x1f".join(parts).encode("utf-8", "surrogatepass"))


def unit_interval(key: str, salt: str = "") -> float:
    """Map a key to [0, 1) deterministically (used for splits and sampling)."""
    return xxhash.xxh3_64_intdigest(f"{salt}\x1f{key}".encode()) / 2**64


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the form that is hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(stage: str, version: str, params: Any, input_hashes: list[str]) -> str:
    """Fingerprint of a stage run: hash(stage name, stage version, parameters, inputs' content hashes)."""
    payload = canonical_json({"stage": stage, "version": version, "params": params, "inputs": input_hashes})
    return hashlib.sha256(payload.encode()).hexdigest()[:24]
