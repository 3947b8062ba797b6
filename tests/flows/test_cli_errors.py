"""User errors at the CLI: one line, exit code 2, before any work; lineage questions on damaged or read-only roots;
credentials that never reach lineage, manifests, Prefect parameters or OpenLineage events."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app, load_config, rebuild_command
from storage.artifacts import ArtifactStore
from storage.lineage import LineageDBError, LineageStore
from tasks.stages import run_all
from tests.support.corpus import tiny_config, write_corpus

REPO = Path(__file__).resolve().parents[2]
SECRETS = ("AKIAEXAMPLEKEY123", "hunter2-secret", "tok-999")


def cli(*args: str) -> subprocess.CompletedProcess:
    """``tokenmill ARGS`` in a fresh process, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, env=env, timeout=120, cwd=REPO
    )


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory: pytest.TempPathFactory):
    """A finished tiny run whose local source carries credentials in storage_options (the filesystem ignores
    them, which is enough to see where they would travel)."""
    base = tmp_path_factory.mktemp("secrets")
    write_corpus(base / "corpus")
    options = {"key": SECRETS[0], "secret": SECRETS[1], "client_kwargs": {"session_token": SECRETS[2]}}
    cfg = tiny_config(
        base / "corpus",
        base / "root",
        sources=[
            {"name": "docs", "path": str(base / "corpus" / "docs"), "storage_options": options},
            {"name": "records", "path": str(base / "corpus" / "records.jsonl.gz")},
        ],
    )
    run_all(cfg, log=lambda m: None, run_id="run-s")
    return cfg


def _no_secret_in(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret} leaked into {where}"


def test_credentials_reach_no_file_of_the_root(secret_run):
    for path in Path(secret_run.root).rglob("*"):
        if path.is_file():
            _no_secret_in(path.read_bytes().decode("latin-1"), str(path))


def test_lineage_show_and_the_recorded_config_hold_placeholders(secret_run):
    result = CliRunner().invoke(app, ["lineage", "show", "run-s", "--root", secret_run.root, "--json"])
    assert result.exit_code == 0, result.output
    _no_secret_in(result.output, "lineage show --json")
    options = json.loads(result.output)["config"]["sources"][0]["storage_options"]
    assert options == {"key": "<redacted>", "secret": "<redacted>", "client_kwargs": {"session_token": "<redacted>"}}


def test_openlineage_events_hold_no_credentials(secret_run, tmp_path: Path):
    pytest.importorskip("openlineage.client")
    out = tmp_path / "events.jsonl"
    result = CliRunner().invoke(app, ["lineage", "openlineage", "run-s", "--to", str(out), "--root", secret_run.root])
    assert result.exit_code == 0, result.output
    _no_secret_in(out.read_text(), "OpenLineage events")


def test_prefect_parameters_hold_no_credentials(secret_run):
    from flows.pipeline import pipeline

    parameters = pipeline.serialize_parameters({"config": secret_run, "force": []})
    _no_secret_in(json.dumps(parameters), "Prefect flow-run parameters")
    assert parameters["config"]["sources"][0]["storage_options"]["secret"] == "<redacted>"


def test_a_mistyped_force_is_refused_at_once_without_echoing_the_config(secret_run, tmp_path: Path):
    config = tmp_path / "secret.yaml"
    config.write_text(json.dumps(secret_run.model_dump(mode="json") | {"sources": [_raw_source(secret_run)]}))
    started = time.monotonic()
    result = cli("run", "--config", str(config), "--force", "bogus")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "error: --force 'bogus' is not a stage; stages are ingest, clean, dedup, tokenizer, tokenize, train, "
        "evaluate, export"
    )
    assert time.monotonic() - started < 30  # no Prefect server was started (that alone takes 15-50 s)
    _no_secret_in(result.stdout + result.stderr, "the --force error")


def _raw_source(cfg) -> dict:
    source = cfg.sources[0]
    return source.model_dump(mode="json") | {"storage_options": source.storage_options}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"- a\n- b\n", "expected a mapping of settings at the top level (name:, sources:, ...), got a list"),
        (b"42\n", "got a number"),
        (b"name: [unclosed\n", "invalid YAML at line 2, column 1"),
        (b"name: caf\xe9\n", "is not UTF-8 text"),
        (b"seed: 1180591620717411303424\n", "seed: Input should be less than or equal to 9223372036854775807"),
    ],
)
def test_a_bad_config_file_is_one_line_and_exit_code_2(tmp_path: Path, content: bytes, expected: str):
    config = tmp_path / "bad.yaml"
    config.write_bytes(content)
    result = CliRunner().invoke(app, ["run", "--config", str(config), "--root", str(tmp_path / "root")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {config}: ") and expected in lines[0], result.output
    assert not (tmp_path / "root").exists()


def test_a_missing_source_path_is_refused_before_prefect_starts(tmp_path: Path):
    config = tmp_path / "c.yaml"
    config.write_text(f"sources:\n  - name: docs\n    path: {tmp_path / 'nowhere'}\nroot: {tmp_path / 'root'}\n")
    result = CliRunner().invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 2 and "does not exist; fix sources[0].path" in result.output, result.output
    assert not (tmp_path / "root").exists()


def test_runs_limit_must_be_positive(secret_run):
    for command in (["runs"], ["lineage", "runs"]):
        result = CliRunner().invoke(app, [*command, "--limit", "-1", "--root", secret_run.root])
        assert result.exit_code == 2 and "--limit" in result.output and "Traceback" not in result.output


def test_showing_an_unknown_run_exits_non_zero(secret_run):
    for command in (["show", "no-such-run"], ["lineage", "show", "no-such-run"]):
        result = CliRunner().invoke(app, [*command, "--root", secret_run.root])
        assert result.exit_code == 1 and "no run 'no-such-run'" in result.output, result.output


def test_takedown_of_an_unknown_id_records_no_tombstone(secret_run):
    result = CliRunner().invoke(app, ["lineage", "takedown", "docs:0000deadbeef", "--apply", "--root", secret_run.root])
    assert result.exit_code == 1, result.output
    assert "no document 'docs:0000deadbeef' in run run-s" in " ".join(result.output.split())
    assert LineageStore(ArtifactStore(secret_run.root).lineage_path, read_only=True).tombstones() == []


def test_the_rebuild_hint_carries_the_runs_own_configuration(secret_run):
    assert rebuild_command(secret_run.root, "run-s") == f"tokenmill run --root {secret_run.root} --from-run run-s"
    cfg = load_config(None, secret_run.root, from_run="run-s")
    assert cfg.model_dump(exclude={"sources"}) == secret_run.model_dump(exclude={"sources"})
    assert "secret" not in cfg.sources[0].storage_options  # credentials come from the environment then


def test_run_without_config_on_a_root_with_runs_reuses_the_latest_recorded_config(secret_run, capsys):
    cfg = load_config(None, secret_run.root, reuse_recorded=True)
    assert cfg.name == "tiny" and [s.name for s in cfg.sources] == ["docs", "records"]
    assert "no --config: reusing the configuration run run-s recorded in" in capsys.readouterr().err


def test_run_without_config_on_an_empty_root_uses_the_default(tmp_path: Path):
    cfg = load_config(None, str(tmp_path / "fresh"), reuse_recorded=True)
    assert cfg.name == "quickstart" and cfg.sources[0].path == "stdlib"


def test_a_corrupt_lineage_file_is_one_line_with_the_recovery(secret_run, tmp_path: Path):
    root = tmp_path / "root"
    shutil.copytree(secret_run.root, root)
    path = ArtifactStore(root).lineage_path
    good = path.read_bytes()
    damaged = {"header": b"\0" * 8192 + good[8192:], "empty": b""}
    for command, kind in zip(
        (["lineage", "runs"], ["runs"], ["lineage", "show", "run-s"], ["lineage", "check"]),
        ["header", "empty"] * 2,
        strict=True,
    ):
        path.write_bytes(damaged[kind])
        result = cli(*command, "--root", str(root))
        assert result.returncode == 2, (command, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: lineage DB {path} is unreadable ("), result.stderr
        assert f"move it aside (mv {path} {path}.corrupt)" in lines[0]


def test_questions_open_the_lineage_file_read_only(secret_run, tmp_path: Path):
    root = tmp_path / "root"
    shutil.copytree(secret_run.root, root)
    path = ArtifactStore(root).lineage_path
    before = path.read_bytes()
    for command in (["lineage", "runs"], ["lineage", "show", "run-s", "--json"], ["lineage", "check", "run-s"]):
        result = CliRunner().invoke(app, [*command, "--root", str(root)])
        assert result.exit_code == 0, result.output
    assert path.read_bytes() == before and not path.with_suffix(".duckdb.wal").exists()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare to mount a read-only root")
def test_a_read_only_root_can_be_queried(secret_run, tmp_path: Path):
    root = tmp_path / "root"
    shutil.copytree(secret_run.root, root)
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip("cannot create a mount namespace here")
    script = (
        f"mount --bind -o ro {root} {root} && touch {root}/probe 2>/dev/null && exit 99; "
        f"{sys.executable} -m flows.cli lineage runs --root {root} --json && "
        f"{sys.executable} -m flows.cli lineage check run-s --root {root} --json"
    )
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"run_id": "run-s"' in result.stdout


def test_an_old_schema_read_only_says_how_to_migrate(tmp_path: Path):
    import duckdb

    path = tmp_path / "lineage.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE schema_version (version INTEGER); INSERT INTO schema_version VALUES (1)")
    con.close()
    with pytest.raises(LineageDBError, match="schema version 1, this tokenmill needs .*tokenmill lineage migrate"):
        LineageStore(path, read_only=True)
