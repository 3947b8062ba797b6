"""The data stages — ingest, clean, dedup, tokenizer, tokenize — and their pieces (readers, filters, MinHash).

May import ``storage``, ``tasks.config``, ``tasks.errors`` and ``tasks.parts``; never training, modeling or flows.
"""
