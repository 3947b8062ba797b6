"""The evaluate stage: whole-split loss, perplexity and bits-per-byte, n-gram baselines, probes and samples.

May import ``storage``, ``tasks.config``, ``tasks.errors``, ``tasks.modeling``, ``tasks.training`` (model loading)
and ``tasks.reporting``'s Markdown helpers.
"""
