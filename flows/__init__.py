"""Prefect flows composing the stages, and the ``tokenmill`` CLI.

Importing this package sets safe defaults for Prefect on small machines before Prefect is imported: a
generous ephemeral-server start-up timeout, and no telemetry.
"""

import os

for _key, _value in {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    "TOKENIZERS_PARALLELISM": "true",
}.items():
    os.environ.setdefault(_key, _value)
