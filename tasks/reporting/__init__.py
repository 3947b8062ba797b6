"""The run report: HTML and Markdown from the artifacts' manifests and lineage.

May import ``storage`` and ``tasks.config`` only.
"""
