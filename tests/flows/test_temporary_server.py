"""A command's temporary Prefect server starts from a verified copy of the migrated empty database."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from deployments.server import api_healthy, temporary_server

pytestmark = pytest.mark.prefect


def test_a_damaged_database_copy_is_replaced_and_a_sound_one_kept(tmp_path: Path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    template = tmp_path / "tokenmill"
    template.mkdir()
    with temporary_settings(updates={PREFECT_HOME: str(tmp_path)}, restore_defaults={PREFECT_API_URL}):
        from deployments.server import _empty_database_template

        damaged = _empty_database_template()
        assert damaged.parent == template
        damaged.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4096)  # a header, then garbage
        with temporary_server() as url:
            assert api_healthy(url) and damaged.exists()
        with closing(sqlite3.connect(damaged)) as db:  # replaced by the freshly migrated, empty database
            assert db.execute("PRAGMA quick_check").fetchone() == ("ok",)
            assert db.execute("SELECT count(*) FROM flow_run").fetchone() == (0,)
        with temporary_server() as url:  # the next command starts from that copy
            assert api_healthy(url)
        assert not api_healthy(url)  # and stops its server on the way out
