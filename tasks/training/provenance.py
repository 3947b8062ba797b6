"""Training-step provenance: which documents (and token spans) optimizer step N of a model read.

Nothing is logged per step. The loader's stream is a pure function of the train artifact's parameters (seed,
batch geometry, block size, source weights) and its tokenize input, so step N's windows are recomputed: step N
(1-based, as ``train_log.jsonl`` numbers them) consumed the global stream positions
``[(N-1)·P, N·P)`` with ``P = grad_accum · batch_size · world_size``; micro-batch ``m`` of it holds positions
``(N-1)·P + m·B·W …`` and rank ``r`` the positions ``≡ r (mod W)`` of each micro-batch (``W`` processes,
``B`` = batch_size). Each window is mapped to its shard and token range and then, through the tokenize ledger's
document spans, to the documents it covers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds

from storage.artifacts import ArtifactStore, Manifest
from tasks.training.loader import LoaderState, MixtureSampler, TokenWindows, make_sampler


def _tokenize_of(store: ArtifactStore, model: Manifest) -> Manifest:
    ref = next(r for r in model.inputs if r.stage == "tokenize")
    manifest = store.load("tokenize", ref.fingerprint)
    if manifest is None:
        raise LookupError(f"tokenize artifact {ref.fingerprint} of model {model.fingerprint} is not in this root")
    return manifest


def find_model(store: ArtifactStore, fingerprint: str) -> Manifest:
    """The train artifact whose fingerprint starts with ``fingerprint``."""
    matches = [m for m in store.published("train") if m.fingerprint.startswith(fingerprint)]
    if len(matches) != 1:
        raise LookupError(f"{len(matches)} trained models match {fingerprint!r} in {store.root}: give more of it")
    return matches[0]


def stream_windows(model: Manifest, tokens: Manifest, first: int, count: int) -> tuple[np.ndarray, TokenWindows]:
    """The window indices at global stream positions ``[first, first + count)`` of this model's loader."""
    params, block = model.params, model.params["model"]["block_size"]
    shards = tokens.files_under("tokens/train-", ".arrow")
    aligned = params["train"].get("align") == "bos"
    windows = TokenWindows(shards, block, tokens.counts["eot_id"] if aligned else None)
    mixture = params.get("mixture")
    if mixture:
        mixture = mixture | {"ledger_files": [str(p) for p in tokens.files_under("ledger/")]}
    sampler = make_sampler(windows, shards, mixture, params["seed"])
    if isinstance(sampler, MixtureSampler):  # the per-source counts at ``first``: replay the schedule
        drawn = np.zeros(len(sampler.sources), dtype=np.int64)
        sampler.schedule(0, first, drawn)
        sampler.state = LoaderState(0, first, drawn.tolist())
    else:
        sampler.state = LoaderState(*divmod(first, len(windows)))
    return sampler.next(count), windows


def step_provenance(store: ArtifactStore, fingerprint: str, step: int) -> dict:
    """The windows of optimizer step ``step`` and, per window, the documents and token spans it covers."""
    model = find_model(store, fingerprint)
    counts = model.counts
    if not 1 <= step <= counts["steps"]:
        raise LookupError(f"model {model.fingerprint[:12]} took steps 1..{counts['steps']}, not {step}")
    tokens = _tokenize_of(store, model)
    batch, world, accum = model.params["train"]["batch_size"], counts["world_size"], counts["grad_accum"]
    per_step = accum * batch * world
    first = (step - 1) * per_step
    indices, windows = stream_windows(model, tokens, first, per_step)
    shard_paths = tokens.files_under("tokens/train-", ".arrow")
    ledger = ds.dataset([str(f) for f in tokens.files_under("ledger/", ".parquet")], format="parquet").to_table(
        columns=["doc_id", "source", "shard", "token_start", "token_end"], filter=pc.field("split") == "train"
    )
    out = []
    for j, index in enumerate(indices.tolist()):
        k = int(np.searchsorted(windows.starts, index, side="right") - 1)
        start = (index - int(windows.starts[k])) * windows.block_size
        end = start + windows.block_size + 1
        shard = Path(shard_paths[k]).stem
        rows = ledger.filter(
            pc.and_(pc.equal(ledger["shard"], shard), pc.and_(pc.less(ledger["token_start"], end),
                                                              pc.greater(ledger["token_end"], start)))
        ).sort_by("token_start")  # fmt: skip
        docs = [_doc_in_window(r, start, end) for r in rows.to_pylist()]
        micro, within = divmod(j, batch * world)
        out.append({"position": first + j, "micro_batch": micro, "rank": within % world, "window": index,
                    "shard": shard, "tokens": [start, end], "docs": docs})  # fmt: skip
    loss = next((r["loss"] for r in _log(model) if r["step"] == step), None)
    return {"model": model.fingerprint, "step": step, "loss": loss, "windows": out,
            "documents": sorted({d["doc_id"] for w in out for d in w["docs"]})}  # fmt: skip


def _doc_in_window(row: dict, start: int, end: int) -> dict:
    """A document a window covers: the window's share of it, and the document's whole span in the shard."""
    covered = [max(row["token_start"], start), min(row["token_end"], end)]
    return {"doc_id": row["doc_id"], "source": row["source"], "tokens": covered,
            "doc_span": [row["token_start"], row["token_end"]]}  # fmt: skip


def _log(model: Manifest) -> list[dict]:
    import json

    path = Path(model.path) / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def highest_loss_steps(store: ArtifactStore, model: Manifest, n: int = 3, skip_warmup: bool = True) -> list[dict]:
    """The ``n`` steps with the highest training loss (after warm-up) and the documents each held."""
    rows = _log(model)
    warmup = model.params["train"].get("warmup_steps", 0) if skip_warmup else 0
    ranked = sorted((r for r in rows if r["step"] > warmup), key=lambda r: -r["loss"])[:n]
    out = []
    for r in ranked:
        answer = step_provenance(store, model.fingerprint, r["step"])
        out.append({"step": r["step"], "loss": r["loss"], "documents": answer["documents"]})
    return out
