"""The fixed evaluation set every trial is scored on, and scoring a trial's model on it.

A trial that changes data parameters (filters, dedup, tokenizer, split fractions) changes its own val split,
so its own validation numbers are not comparable with another trial's. Every trial is therefore scored on the
same documents: the base config's val documents (text from the base dedup artifact, chosen by the base
tokenize ledger), encoded with the trial's own tokenizer. The stream starts with an end-of-text token, so every
byte of every document is predicted exactly once and bits-per-byte has the same denominator (the documents'
UTF-8 bytes) for every tokenizer. The test documents form a second set, built only when the winner is tested.

Both are content-addressed artifacts (``sweep-eval-set``, ``sweep-score``) built through the artifact store,
so a rerun of a sweep reuses them, and a score is recomputed only when the model or the set changes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from storage.artifacts import ArtifactStore, Manifest, StageContext, StageKey
from tasks.data.tokenizer import load_tokenizer
from tasks.evaluation.evaluate import token_byte_lengths, token_nll
from tasks.modeling.weights import load_model

EVAL_SET_STAGE = "sweep-eval-set"
EVAL_SET_VERSION = "1"
SCORE_STAGE = "sweep-score"
SCORE_VERSION = "1"
DOCUMENTS_FILE = "documents.parquet"
SCORE_FILE = "score.json"
SCORE_BATCH = 16


def _ledger_splits(tokenize: Manifest) -> pa.Table:
    return pq.read_table(tokenize.files_under("ledger/", ".parquet"), columns=["doc_id", "split"])


def build_eval_set(
    store: ArtifactStore, dedup: Manifest, tokenize: Manifest, split: str, max_docs: int | None, log=print
) -> tuple[Manifest, bool]:
    """The base config's ``split`` documents (doc_id, source, text) as one sorted Parquet file."""

    def produce(ctx: StageContext) -> dict[str, Any]:
        ledger = _ledger_splits(tokenize)
        wanted = ledger.filter(pc.equal(ledger["split"], split))["doc_id"]
        docs = pq.read_table(dedup.files_under("docs/", ".parquet"), columns=["doc_id", "source", "text", "n_bytes"])
        docs = docs.filter(pc.is_in(docs["doc_id"], value_set=wanted)).sort_by("doc_id")
        if max_docs is not None:
            docs = docs.slice(0, max_docs)
        pq.write_table(docs, ctx.out_dir / DOCUMENTS_FILE, compression="zstd")
        return {"split": split, "docs": docs.num_rows, "bytes": int(pc.sum(docs["n_bytes"]).as_py() or 0)}

    params = {"split": split, "max_docs": max_docs}
    key = StageKey(stage=EVAL_SET_STAGE, version=EVAL_SET_VERSION, params=params, inputs=[dedup.ref(), tokenize.ref()])
    return store.build(key, produce, log=log)


def eval_doc_ids(eval_set: Manifest) -> list[str]:
    return pq.read_table(eval_set.file(DOCUMENTS_FILE), columns=["doc_id"])["doc_id"].to_pylist()


def score_documents(model_dir: Path, tokenizer_dir: Path, documents: Path, eot: int, batch_size: int) -> dict:
    """Loss (nats per token) and bits per byte of a model over documents encoded by its tokenizer."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_dir, device)
    tokenizer = load_tokenizer(tokenizer_dir)
    texts = pq.read_table(documents, columns=["text"])["text"].to_pylist()
    ids = [eot]
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids += [*encoding.ids, eot]
    tokens = np.asarray(ids, dtype=np.int64)
    nats = token_nll(model, tokens, batch_size, device)[1:]
    n_bytes = int(token_byte_lengths(tokenizer)[tokens[1:]].sum())
    total = float(nats.sum())
    return {
        "docs": len(texts),
        "tokens": len(nats),
        "bytes": n_bytes,
        "text_bytes": sum(len(t.encode("utf-8")) for t in texts),
        "loss": total / max(len(nats), 1),
        "bits_per_byte": total / math.log(2) / max(n_bytes, 1),
    }


def score_trial(
    store: ArtifactStore,
    train: Manifest,
    tokenizer: Manifest,
    tokenize: Manifest,
    eval_set: Manifest,
    log=print,
) -> tuple[Manifest, bool]:
    """Score a trial's model on a fixed set; also count the set's documents that sit in the trial's train split."""

    def produce(ctx: StageContext) -> dict[str, Any]:
        documents, eot = eval_set.file(DOCUMENTS_FILE), tokenize.counts["eot_id"]
        counts = score_documents(Path(train.path), Path(tokenizer.path), documents, eot, SCORE_BATCH)
        ledger = _ledger_splits(tokenize)
        in_train = ledger.filter(pc.equal(ledger["split"], "train"))["doc_id"]
        ids = pa.array(eval_doc_ids(eval_set), pa.string())
        counts["docs_in_train"] = int(pc.sum(pc.is_in(ids, value_set=in_train)).as_py() or 0)
        counts["split"] = eval_set.counts["split"]
        (ctx.out_dir / SCORE_FILE).write_text(json.dumps(counts, indent=2, sort_keys=True))
        return counts

    inputs = [m.ref() for m in (train, tokenizer, tokenize, eval_set)]
    key = StageKey(stage=SCORE_STAGE, version=SCORE_VERSION, params={"batch_size": SCORE_BATCH}, inputs=inputs)
    return store.build(key, produce, log=log)
