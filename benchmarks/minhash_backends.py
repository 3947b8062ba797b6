"""Signing throughput: tokenmill's NumPy MinHash vs rensa (Rust) and datasketch, on the same texts, one core.

    python -m benchmarks.minhash_backends --docs 2000 --permutations 100

Every backend gets the same job: normalized word 5-grams of each text → a signature of ``--permutations``
values. rensa and datasketch take shingles as Python strings, so building those strings is part of their
cost (as it would be in the stage); libraries that are not installed are skipped
(``pip install rensa datasketch`` to include them; they are not tokenmill dependencies).
"""

from __future__ import annotations

import argparse
import time

from benchmarks.dedup_corpus import make_corpus
from tasks.data.minhash import MinHasher, MinHashParams, dedup_words


def shingle_strings(text: str, n: int = 5) -> list[str]:
    ws = dedup_words(text)
    return [" ".join(ws[i : i + n]) for i in range(max(1, len(ws) - n + 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2000, help="originals in the synthetic corpus")
    ap.add_argument("--permutations", type=int, default=100)
    ap.add_argument("--batch", type=int, default=2048)
    args = ap.parse_args()
    texts = [d.text for d in make_corpus(args.docs, seed=3)]
    words = sum(len(t.split()) for t in texts)
    print(f"{len(texts)} texts, {words / len(texts):.0f} words each on average, {args.permutations} permutations")

    def numpy_backend() -> None:
        hasher = MinHasher(MinHashParams(ngram=5, permutations=args.permutations, bands=1, rows=1))
        for i in range(0, len(texts), args.batch):
            hasher.signatures(*hasher.shingles(texts[i : i + args.batch]))

    backends = {"tokenmill numpy (batched)": numpy_backend}
    try:
        import rensa

        def rensa_backend() -> None:
            for text in texts:
                m = rensa.RMinHash(num_perm=args.permutations, seed=0)
                m.update(shingle_strings(text))
                m.digest()

        backends["rensa RMinHash"] = rensa_backend
    except ImportError:
        print("rensa not installed: skipped")
    try:
        import datasketch

        def datasketch_backend() -> None:
            for text in texts:
                m = datasketch.MinHash(num_perm=args.permutations, seed=0)
                m.update_batch([s.encode() for s in shingle_strings(text)])

        backends["datasketch MinHash"] = datasketch_backend
    except ImportError:
        print("datasketch not installed: skipped")

    print("\n| backend | docs/s (CPU time) | relative |\n| --- | ---: | ---: |")
    rates = {}
    for name, run in backends.items():
        start = time.process_time()
        run()
        rates[name] = len(texts) / (time.process_time() - start)
    base = rates["tokenmill numpy (batched)"]
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
