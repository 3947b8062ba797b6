"""The Prefect-free domain code: the configuration, the stage specs and every stage's implementation.

Layers, lowest first (a module imports only from its own layer or below; nothing here imports Prefect):

- ``storage``: artifacts, shards, ledgers, lineage, the stage graph (third-party libraries only).
- ``tasks.errors``, ``tasks.config``, ``tasks.parts``: user-facing errors, the configuration tree, where parts run.
- ``tasks.data``: ingest, clean, dedup, tokenizer, tokenize and their pieces (readers, filters, MinHash).
- ``tasks.modeling``: the Transformer and its export. Imports no other ``tasks`` subpackage.
- ``tasks.training``: the train stage, its loop, checkpoints, loader and torchrun launch (may use ``modeling``).
- ``tasks.evaluation``: evaluate, baselines and probes (may use ``modeling``, ``training``'s model loading).
- ``tasks.reporting``: the run report (may read every artifact's output through ``storage``).
- ``tasks.stages``: binds each stage of the graph to its parameters and producing function (imports all above).

``flows`` (Prefect) sits above all of them, ``deployments`` above ``flows``.
"""
