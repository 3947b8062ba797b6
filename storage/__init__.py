"""Artifact layout, atomic publishing, shard I/O and the DuckDB lineage store."""
