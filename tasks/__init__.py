"""Pipeline stages as plain functions (no Prefect import), the model, and the configuration."""
