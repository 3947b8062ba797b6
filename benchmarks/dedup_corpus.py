"""A synthetic corpus with planted near-duplicates of known true Jaccard similarity (for dedup benchmarks).

Originals are Zipf-distributed pseudo-English paragraphs with numbers and punctuation; some share boilerplate
(a precision trap). About a third of them get 1–3 variants: exact copies, whitespace/case/punctuation/number
noise, added boilerplate, truncations, paragraph shuffles, light/medium/heavy word edits and splices with
another original. Each variant knows its parent; its true similarity is the exact Jaccard of the two
documents' word 5-gram sets after the dedup normalization (``tasks.data.minhash.dedup_words``).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.data.minhash import dedup_words

VARIANT_KINDS = (
    "exact",
    "noise",
    "boilerplate",
    "truncate",
    "shuffle",
    "light_edit",
    "medium_edit",
    "heavy_edit",
    "splice",
)
EDIT_RATES = {"light_edit": (0.01, 0.03), "medium_edit": (0.04, 0.08), "heavy_edit": (0.10, 0.25)}


@dataclass
class Doc:
    doc_id: str
    text: str
    family: tuple[str, ...]  # the originals this document derives from (an original: itself)
    kind: str = "original"
    parent: str | None = None
    true_jaccard: float | None = None


class _Words:
    def __init__(self, rng: random.Random, size: int = 30_000):
        self.vocab = list(
            dict.fromkeys("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10))) for _ in range(size))
        )
        weights = 1.0 / np.arange(1, len(self.vocab) + 1) ** 1.07
        self.cum = np.cumsum(weights / weights.sum())

    def sample(self, rng: random.Random, n: int) -> list[str]:
        return [self.vocab[int(i)] for i in np.searchsorted(self.cum, [rng.random() for _ in range(n)])]


def _sentence(words: _Words, rng: random.Random) -> str:
    ws = words.sample(rng, rng.randint(6, 22))
    if rng.random() < 0.3:
        ws.insert(rng.randrange(len(ws)), str(rng.randint(1, 2030)))
    if len(ws) > 8 and rng.random() < 0.5:
        ws[rng.randrange(2, len(ws) - 2)] += ","
    return " ".join(ws).capitalize() + rng.choice(".....?!")


def _paragraphs(words: _Words, rng: random.Random, n_words: int) -> list[str]:
    paras, count = [], 0
    while count < n_words:
        para = " ".join(_sentence(words, rng) for _ in range(rng.randint(2, 6)))
        paras.append(para)
        count += len(para.split())
    return paras


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    ws = dedup_words(text)
    if len(ws) < n:
        return {tuple(ws)} if ws else set()
    return {tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)}


def true_jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0


def _edit_words(text: str, rate: float, words: _Words, rng: random.Random) -> str:
    tokens = text.split(" ")
    for _ in range(max(1, int(len(tokens) * rate))):
        i = rng.randrange(len(tokens))
        op = rng.random()
        if op < 0.5:
            tokens[i] = words.sample(rng, 1)[0]
        elif op < 0.75 and len(tokens) > 10:
            del tokens[i]
        else:
            tokens.insert(i, words.sample(rng, 1)[0])
    return " ".join(tokens)


def _noise(text: str, rng: random.Random) -> str:
    out = []
    for token in text.split(" "):
        r = rng.random()
        if token.isdigit():
            token = str(rng.randint(1, 99999))
        elif r < 0.05:
            token = token.upper()
        elif r < 0.10:
            token = token.title()
        if rng.random() < 0.05:
            token += rng.choice([",", ";", " -", ":"])
        out.append(token)
    return rng.choice(["  ", " ", "\t"]).join(out).replace("\n\n", "\n \n   ")


def make_corpus(n_originals: int, seed: int = 0, variant_share: float = 0.35) -> list[Doc]:
    """Originals plus planted variants, in a shuffled order (a variant may come before its original)."""
    rng = random.Random(seed)
    words = _Words(rng)
    boilerplates = [" ".join(_sentence(words, rng) for _ in range(rng.randint(2, 4))) for _ in range(8)]
    originals: list[Doc] = []
    for i in range(n_originals):
        paras = _paragraphs(words, rng, int(rng.lognormvariate(5.6, 0.6)) + 40)
        if rng.random() < 0.3:  # shared site boilerplate on unrelated originals
            paras = [rng.choice(boilerplates), *paras]
        originals.append(Doc(f"o{i:07d}", "\n\n".join(paras), (f"o{i:07d}",)))
    docs = list(originals)
    n_variants = 0
    for orig in originals:
        if rng.random() >= variant_share:
            continue
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            kind = rng.choice(VARIANT_KINDS)
            text, family = orig.text, orig.family
            if kind == "noise":
                text = _noise(text, rng)
            elif kind == "boilerplate":
                text = f"{rng.choice(boilerplates)}\n\n{text}\n\n{rng.choice(boilerplates)}"
            elif kind == "truncate":
                tokens = text.split(" ")
                text = " ".join(tokens[: max(10, int(len(tokens) * rng.uniform(0.6, 0.95)))])
            elif kind == "shuffle":
                paras = text.split("\n\n")
                rng.shuffle(paras)
                text = "\n\n".join(paras)
            elif kind in EDIT_RATES:
                text = _edit_words(text, rng.uniform(*EDIT_RATES[kind]), words, rng)
            elif kind == "splice":
                other = rng.choice(originals)
                a, b = text.split(" "), other.text.split(" ")
                cut = rng.uniform(0.5, 0.85)
                text = " ".join(a[: int(len(a) * cut)] + b[int(len(b) * cut) :])
                family = orig.family + other.family
            docs.append(Doc(f"v{n_variants:07d}", text, family, kind, orig.doc_id, true_jaccard(text, orig.text)))
            n_variants += 1
    rng.shuffle(docs)
    return docs


def write_clean_shards(docs: list[Doc], folder: Path, rows_per_shard: int = 50_000) -> list[Path]:
    """The corpus as clean-stage Parquet shards (what the dedup stage reads)."""
    from storage.hashing import text_hash
    from storage.shards import ParquetShardWriter
    from tasks.data.clean import CLEAN_SCHEMA, normalize

    with ParquetShardWriter(folder, "docs", CLEAN_SCHEMA, rows_per_shard=rows_per_shard) as writer:
        for start in range(0, len(docs), 10_000):
            rows = []
            for i, doc in enumerate(docs[start : start + 10_000], start):
                text = normalize(doc.text)
                rows.append(
                    {
                        "doc_id": doc.doc_id,
                        "source": "synthetic",
                        "locator": doc.doc_id,
                        "ordinal": i,
                        "text": text,
                        "n_bytes": len(text.encode()),
                        "content_hash": text_hash(text),
                    }
                )
            writer.write_rows(rows)
    return writer.paths
