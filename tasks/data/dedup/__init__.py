"""Dedup: exact duplicates by content hash, near-duplicates by MinHash LSH, incrementally against an index.

The stage runs in passes over the clean Parquet shards, each bounded in memory:

1. **Plan** (DuckDB, no text read): rank documents by the ``keep`` policy, find exact duplicates with a window
   over ``content_hash`` and, given an earlier index, anti-join against its exact hashes.
2. **Sign** (NumPy, fans out over worker processes): documents left after exact dedup get MinHash band hashes
   (see ``tasks.data.minhash``), streamed to a Parquet file in the work folder.
3. **Candidates** (DuckDB over Parquet, spills to disk): a band-hash group-by gives each bucket's best-ranked
   document; every other member becomes a candidate pair with it ("star" edges, linear in bucket size,
   unlike all pairs). New documents are also joined against the earlier index's band hashes.
4. **Verify and cluster**: texts of documents in candidate pairs are shingled again and pairs below the
   exact-Jaccard ``threshold`` are dropped (or the MinHash estimate, with ``verify: false``); connected
   components of the rest are the clusters, represented by their best-ranked member (an indexed document
   always wins: it is already published).
5. **Write** (in input order, so bytes are deterministic): kept documents with ``split_key`` (their cluster),
   a ledger row per input document (``duplicate_of``, ``similarity``, ``cluster_id``), the index of the kept
   corpus (exact hashes + band hashes) and ``report.md`` with the LSH S-curve.

Scale (measured numbers and the 100M-document plan): docs/dedup.md.
"""

from tasks.data.dedup.clusters import connected_components
from tasks.data.dedup.index import resolve_previous
from tasks.data.dedup.stage import VERSION, dedup, stage_params

__all__ = ["VERSION", "connected_components", "dedup", "resolve_previous", "stage_params"]
