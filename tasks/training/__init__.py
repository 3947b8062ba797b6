"""The train stage: its entry, the training loop, checkpoints, the window loader and the torchrun launch.

May import ``storage``, ``tasks.config``, ``tasks.errors`` and ``tasks.modeling``; never the data stages or flows.
"""
