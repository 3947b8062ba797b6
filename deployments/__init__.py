"""Prefect deployments of the tokenmill flows, and how to start a local Prefect server for them."""
