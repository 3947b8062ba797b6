"""Decontamination at scale: documents checked against an evaluation set's n-grams, two lookups side by side.

A synthetic corpus (Zipf-distributed words from a 20,000-word vocabulary, ``--words`` words per document) and
``--items`` evaluation items of 20–40 words; ``--planted`` items are copied into documents, so both lookups must
find exactly those. Per batch of documents the n-grams are hashed once (``tasks.data.minhash``; timed on its
own), then looked up by

- ``set filter``: tokenmill's ``NgramIndex.hits`` — one ``searchsorted`` into the sorted item n-grams, then the
  per-item overlap of the few documents with a hit (``check_batch``);
- ``duckdb join``: the batch's (document, n-gram) pairs registered as an Arrow table and hash-joined with the
  item n-grams in DuckDB, overlap per (document, item) by ``GROUP BY``.

    python benchmarks/decontaminate.py --docs 1000000 --items 10000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.data.decontaminate import NgramIndex, check_batch, ngram_hasher  # noqa: E402

VOCAB = [f"w{i}" for i in range(20_000)]
WEIGHTS = 1.0 / (np.arange(len(VOCAB)) + 10.0)
WEIGHTS /= WEIGHTS.sum()


def _texts(rng: np.random.Generator, n: int, words: int) -> list[str]:
    picks = rng.choice(len(VOCAB), size=(n, words), p=WEIGHTS)
    vocab = np.array(VOCAB, dtype=object)
    return [" ".join(row) for row in vocab[picks]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--words", type=int, default=120)
    parser.add_argument("--ngram", type=int, default=13)
    parser.add_argument("--planted", type=int, default=100)
    parser.add_argument("--batch", type=int, default=20_000)
    parser.add_argument("--duckdb-docs", type=int, default=None, help="Documents the DuckDB join runs on (default all)")
    args = parser.parse_args()
    import duckdb
    import pyarrow as pa

    rng = np.random.default_rng(0)
    item_texts = [_texts(rng, 1, int(rng.integers(20, 41)))[0] for _ in range(args.items)]
    item_ids = [f"item-{i}" for i in range(args.items)]
    t0 = time.perf_counter()
    index = NgramIndex.build("bench", [(item_texts, item_ids)], args.ngram)
    index_s = time.perf_counter() - t0
    hosts = rng.choice(args.docs, args.planted, replace=False)
    planted = {int(d): int(i) for d, i in zip(hosts, rng.choice(args.items, args.planted, replace=False), strict=True)}
    con = duckdb.connect()
    con.register("items", pa.table({"gram": index.grams.view(np.int64), "item": index.items}))
    con.execute("CREATE TABLE item_grams AS SELECT * FROM items")
    hasher = ngram_hasher(args.ngram)
    timings = {"generate": 0.0, "hash": 0.0, "set_filter": 0.0, "duckdb_join": 0.0}
    found_set: set[tuple[int, str]] = set()
    found_duck: set[tuple[int, str]] = set()
    duck_docs = args.duckdb_docs if args.duckdb_docs is not None else args.docs
    grams_total = 0
    for lo in range(0, args.docs, args.batch):
        n = min(args.batch, args.docs - lo)
        t = time.perf_counter()
        texts = _texts(rng, n, args.words)
        for d, i in planted.items():
            if lo <= d < lo + n:
                texts[d - lo] = texts[d - lo] + " " + item_texts[i]
        timings["generate"] += time.perf_counter() - t
        t = time.perf_counter()
        shingles, offsets = hasher.shingles(texts)
        timings["hash"] += time.perf_counter() - t
        grams_total += len(shingles)
        t = time.perf_counter()
        ids = [str(lo + j) for j in range(n)]
        for matches in check_batch(ids, ["s"] * n, texts, [index], args.ngram, 0.2, shingles=(shingles, offsets)):
            for m in matches:
                found_set.update((int(m.doc_id), item) for item, _ in m.items)
        timings["set_filter"] += time.perf_counter() - t
        if lo < duck_docs:
            t = time.perf_counter()
            doc = np.repeat(np.arange(lo, lo + n, dtype=np.int64), np.diff(offsets))
            con.register("batch", pa.table({"gram": shingles.view(np.int64), "doc": doc}))
            rows = con.execute(
                "SELECT b.doc, i.item, count(DISTINCT b.gram) AS shared FROM batch b JOIN item_grams i USING (gram) "
                "GROUP BY ALL"
            ).fetchall()
            con.unregister("batch")
            for doc_no, item, shared in rows:
                if shared / index.item_grams[item] >= 0.2:
                    found_duck.add((int(doc_no), item_ids[item]))
            timings["duckdb_join"] += time.perf_counter() - t
    expected = {(d, item_ids[i]) for d, i in planted.items()}
    duck_expected = {(d, i) for d, i in expected if d < duck_docs}
    result = {
        "docs": args.docs,
        "items": args.items,
        "item_ngrams": len(index.grams),
        "doc_ngrams": grams_total,
        "ngram": args.ngram,
        "index_build_s": round(index_s, 3),
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "docs_per_s": {
            "hash": round(args.docs / timings["hash"]),
            "set_filter": round(args.docs / timings["set_filter"]),
            "duckdb_join": round(min(duck_docs, args.docs) / timings["duckdb_join"])
            if timings["duckdb_join"]
            else None,
        },
        "duckdb_docs": min(duck_docs, args.docs),
        "set_filter_found_planted": len(expected & found_set) == len(expected),
        "set_filter_extra": len(found_set - expected),
        "duckdb_found_planted": duck_expected <= found_duck,
        "duckdb_extra": len(found_duck - duck_expected),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
