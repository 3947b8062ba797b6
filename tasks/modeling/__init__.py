"""The decoder-only Transformer, its weight files and its export to transformers.

May import ``storage``, ``tasks.config`` and ``tasks.errors`` only: the model knows nothing of training or data.
"""
