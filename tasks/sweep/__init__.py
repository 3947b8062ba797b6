"""Sweeps: tune model and data parameters on a fixed validation set, then read the test split once.

``spec`` parses and checks a sweep spec, ``study`` wires it to an Optuna study, ``evalset`` builds the fixed
evaluation documents and scores a trial's model on them, ``storage.leaderboard`` ranks trials. No Prefect here: the
flow in ``flows/sweep.py`` runs trials as tasks.
"""
