"""Lineage questions on a real run of the tiny corpus: doc, why, source, diff, takedown, graph, show, check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from storage.artifacts import ArtifactStore
from storage.lineage import SCHEMA_VERSION, LineageStore
from storage.lineage_queries import LineageQueries
from tasks.stages import STAGES, run_all
from tests.support.corpus import tiny_config, write_corpus


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("lineage")
    write_corpus(base / "corpus")
    cfg = tiny_config(base / "corpus", base / "root")
    manifests = run_all(cfg, log=lambda m: None, run_id="run-a")
    store = LineageStore(ArtifactStore(cfg.root).lineage_path)
    return cfg, manifests, LineageQueries(store)


def _doc_id(q: LineageQueries, locator: str) -> str:
    rows = q.store.query(
        "SELECT doc_id FROM read_parquet(?) WHERE locator = ?", [q.store.ledger_files("run-a", ("ingest",)), locator]
    )
    return rows[0]["doc_id"]


def test_doc_follows_a_kept_document_to_its_shard_and_model(run):
    _, manifests, q = run
    doc_id = _doc_id(q, "prose_00.txt")
    info = q.doc(doc_id)
    assert [s["stage"] for s in info["stages"]] == ["ingest", "clean", "dedup", "tokenize"]
    assert info["shard"].startswith(info["split"])
    if info["split"] == "train":
        assert [m["fingerprint"] for m in info["models"] if m["relation"] == "trained_on"] == [
            manifests["train"].fingerprint
        ]
    else:  # held-out documents are evaluated on, never trained on
        assert {m["relation"] for m in info["models"]} == {"evaluated_on"}


def test_why_names_the_filter_or_the_duplicate(run):
    _, _, q = run
    assert q.why(_doc_id(q, "binary.txt"))["reason"] == "binary"
    short = q.why(_doc_id(q, "short.txt"))
    assert (short["stage"], short["reason"], short["score"]) == ("clean", "too_short", 9.0)
    dup = q.why(_doc_id(q, "nested/deeper/copy_of_prose_03.txt"))
    assert dup["duplicate_of_locator"] == "prose_03.txt" and dup["similarity"] == 1.0


def test_source_counts_shards_and_models(run):
    _, manifests, q = run
    result = q.source("records")
    ingest = {(f["fate"], f["reason"]): f["docs"] for f in result["fates"] if f["stage"] == "ingest"}
    assert ingest == {("kept", ""): 10, ("dropped", "malformed_json"): 1, ("dropped", "missing_text_field"): 1}
    assert sum(s["docs"] for s in result["shards"]) == 10
    with pytest.raises(LookupError, match="no source"):
        q.source("nope")


def test_check_passes_on_a_clean_run_and_catches_a_bit_flip(run, tmp_path: Path):
    _, manifests, q = run
    assert q.check("run-a")["ok"], q.check("run-a")["problems"]
    shard = manifests["tokenize"].files_under("tokens/")[0]
    original = shard.read_bytes()
    try:
        shard.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        result = q.check("run-a")
        assert not result["ok"] and "SHA-256" in result["problems"][0]
    finally:
        shard.write_bytes(original)


def _questions(root: Path) -> LineageQueries:
    return LineageQueries(LineageStore(root / "lineage.duckdb", read_only=True))


def test_lineage_on_a_copied_or_moved_root_reads_that_root(run, tmp_path: Path):
    """Artifacts are resolved under the root lineage is opened on: ``check`` verifies the copy's own files (a
    damaged copy fails while the original passes) and ``check``/``doc`` work on a root that was moved away."""
    cfg, manifests, q = run
    root = Path(cfg.root)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)
    shard = copy / manifests["tokenize"].files_under("tokens/")[0].relative_to(root)
    shard.chmod(0o644)
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    damaged = _questions(copy).check("run-a")
    assert not damaged["ok"] and str(shard.parent.parent) in damaged["problems"][0]
    assert q.check("run-a")["ok"], "the original is untouched"
    doc_id = _doc_id(q, "prose_00.txt")
    moved = root.with_name(root.name + "-moved")
    root.rename(moved)  # nothing is left where the artifacts were built
    try:
        after_move = _questions(moved)
        result = after_move.check("run-a")
        assert result["ok"], result["problems"]
        assert all(a["uri"].startswith(str(moved)) for a in after_move.show("run-a")["artifacts"])
        assert [s["stage"] for s in after_move.doc(doc_id)["stages"]] == ["ingest", "clean", "dedup", "tokenize"]
        fp = manifests["tokenize"].fingerprint
        assert ArtifactStore(moved).load("tokenize", fp).path == str(moved / "tokenize" / fp)
    finally:
        moved.rename(root)


def test_graph_has_every_stage(run):
    _, manifests, q = run
    mermaid = q.graph("run-a")
    assert mermaid.startswith("flowchart LR") and "trained_on" in mermaid and "evaluated_on" in mermaid
    assert all(m.fingerprint[:8] in mermaid for m in manifests.values())
    assert q.graph("run-a", "dot").startswith("digraph")


def test_schema_is_versioned(run):
    _, _, q = run
    assert q.store.query("SELECT max(version) AS v FROM schema_version")[0]["v"] == SCHEMA_VERSION


def test_cli_answers_in_json(run):
    cfg, _, q = run
    doc_id = _doc_id(q, "prose_01.txt")
    result = CliRunner().invoke(app, ["lineage", "doc", doc_id, "--root", cfg.root, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["doc_id"] == doc_id
    missing = CliRunner().invoke(app, ["lineage", "doc", "docs:0000", "--root", cfg.root])
    assert missing.exit_code == 1 and "no document 'docs:0000' in run" in missing.output


def test_takedown_plan_names_the_exported_model_and_rebuilds_through_export(run):
    """The export reads the model, not the tokens: the plan still names it, through the train edge."""
    _, manifests, q = run
    trained = q.store.query(
        "SELECT doc_id FROM read_parquet(?) WHERE split = 'train' ORDER BY doc_id LIMIT 1",
        [q.store.ledger_files("run-a", ("tokenize",))],
    )[0]["doc_id"]
    plan = q.takedown(trained, "run-a")
    named = {(m["stage"], m["fingerprint"], m["relation"]) for m in plan["models"]}
    assert ("train", manifests["train"].fingerprint, "trained_on") in named
    assert ("export", manifests["export"].fingerprint, "exported_from") in named
    assert plan["plan"][1]["stages"] == ("clean", "dedup", "tokenizer", "tokenize", "train", "evaluate", "export")


def test_takedown_walkthrough_diff_and_rebuild(tmp_path: Path):
    """Remove a document that has an exact copy: both copies are found, tombstoned, and gone after the rerun."""
    write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / "corpus", tmp_path / "root")
    before = run_all(cfg, log=lambda m: None, run_id="before")
    q = LineageQueries(LineageStore(ArtifactStore(cfg.root).lineage_path))
    target = _doc_id_in(q, "before", "nested/deeper/copy_of_prose_03.txt")  # the dropped duplicate
    plan = q.takedown(target, "before")
    assert len(plan["copies"]) == 2  # the duplicate and the kept representative prose_03.txt
    assert len(plan["placements"]) == 1  # only the representative reached the shards
    q.apply_takedown(plan, "test")

    after = run_all(cfg, log=lambda m: None, run_id="after")
    assert after["clean"].fingerprint != before["clean"].fingerprint
    assert after["ingest"].fingerprint == before["ingest"].fingerprint  # ingest is untouched
    assert after["clean"].counts["dropped"]["takedown"] == 2
    for copy in plan["copies"]:
        assert q.doc(copy, "after")["shard"] is None
        assert q.why(copy, "after")["reason"] == "takedown"
    diff = q.diff("before", "after")
    assert all(r["added"] == r["removed"] == 0 for r in diff["sources"])  # the sources did not change …
    removed = sum(r["removed"] for r in diff["training"])  # … but what reached training did
    assert removed == (1 if plan["placements"][0]["split"] == "train" else 0), diff["training"]
    assert sum(r["added"] for r in diff["training"]) == 0


def test_a_document_is_found_by_path_locator_or_id(tmp_path: Path):
    write_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / "corpus", tmp_path / "root")
    run_all(cfg, log=lambda m: None, run_id="r1")
    q = LineageQueries(LineageStore(ArtifactStore(cfg.root).lineage_path))
    doc_id = _doc_id_in(q, "r1", "prose_03.txt")
    by_path = q.find_docs(str(tmp_path / "corpus" / "docs" / "prose_03.txt"), "r1")
    assert [d["doc_id"] for d in by_path] == [doc_id]
    assert [d["doc_id"] for d in q.find_docs("prose_03.txt", "r1")] == [doc_id]
    assert [d["doc_id"] for d in q.find_docs(doc_id, "r1")] == [doc_id]
    assert [d["doc_id"] for d in q.find_docs("x", "r1", candidate_ids=[doc_id])] == [doc_id]  # an id-field value
    assert q.find_docs("no/such/file.txt", "r1") == []


def _doc_id_in(q: LineageQueries, run_id: str, locator: str) -> str:
    files = q.store.ledger_files(run_id, ("ingest",))
    return q.store.query("SELECT doc_id FROM read_parquet(?) WHERE locator = ?", [files, locator])[0]["doc_id"]


def test_diff_counts_added_removed_changed(tmp_path: Path):
    write_corpus(tmp_path / "corpus")
    docs = tmp_path / "corpus" / "docs"
    cfg = tiny_config(tmp_path / "corpus", tmp_path / "root")
    run_all(cfg, log=lambda m: None, run_id="r1")
    (docs / "prose_00.txt").unlink()
    (docs / "prose_01.txt").write_text("A rewritten document with entirely new words in it. " * 5)
    (docs / "brand_new.txt").write_text("A document that did not exist before this refresh. " * 5)
    run_all(cfg, log=lambda m: None, run_id="r2")
    q = LineageQueries(LineageStore(ArtifactStore(cfg.root).lineage_path))
    diff = {r["source"]: r for r in q.diff("r1", "r2")["sources"]}
    assert (diff["docs"]["added"], diff["docs"]["removed"], diff["docs"]["changed"]) == (1, 1, 1)
    assert diff["records"]["added"] == diff["records"]["removed"] == diff["records"]["changed"] == 0

    run_all(cfg, log=lambda m: None, run_id="r3")  # nothing changed: every stage cached
    same = q.diff("r2", "r3")
    assert same["method"] == "same artifacts" and same["sources"] == q._diff_scan("r2", "r3")
    assert all(r["unchanged"] > 0 and r["added"] + r["removed"] + r["changed"] == 0 for r in same["sources"])
    q.store.record_refresh_diff("r2", "r1", q._diff_scan("r1", "r2"))
    recorded = q.diff("r1", "r2")
    assert recorded["method"] == "recorded by the refresh" and {r["source"]: r for r in recorded["sources"]} == diff


def test_openlineage_export_writes_start_and_complete_per_stage(run, tmp_path: Path):
    pytest.importorskip("openlineage.client")
    from storage.openlineage_export import export_run

    _, manifests, q = run
    out = tmp_path / "events.jsonl"
    n = export_run(q.store, "run-a", out)
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(events) == n == 2 + 2 * len(STAGES)
    tokenize_done = next(e for e in events if e["job"]["name"] == "tokenmill.tokenize" and e["eventType"] == "COMPLETE")
    output = tokenize_done["outputs"][0]
    assert output["facets"]["version"]["datasetVersion"] == manifests["tokenize"].content_hash
    assert output["outputFacets"]["outputStatistics"]["rowCount"] == manifests["tokenize"].counts["kept"]
    assert tokenize_done["run"]["facets"]["parent"]["job"]["name"] == "tokenmill.tiny"
    assert {i["name"] for i in tokenize_done["inputs"]} == {manifests["dedup"].path, manifests["tokenizer"].path}


def test_questions_leave_the_lineage_file_free_for_writers(run, tmp_path: Path):
    """A question attaches the file to this process's DuckDB and detaches it when answered: a writer in another
    process (the flow) and in this one can open it right after."""
    import shutil
    import subprocess
    import sys

    doc_id = _doc_id(run[2], "prose_00.txt")
    shutil.copy(run[2].store.path, tmp_path / "lineage.duckdb")  # a copy: this test adds runs
    for stage in STAGES:  # lineage resolves artifacts under the root its file lies in: link the original's
        (tmp_path / stage).symlink_to(run[2].store.path.parent / stage)
    q = LineageQueries(LineageStore(tmp_path / "lineage.duckdb"))
    assert q.doc(doc_id, "run-a")["doc_id"] == doc_id
    script = (
        "import sys; from storage.lineage import LineageStore, retry_while_locked; "
        "import storage.lineage as l; l.retry_while_locked = lambda fn, timeout_s=60: fn(); "
        "LineageStore(sys.argv[1]).start_run('other-process', 'p', {}, 0, None)"
    )
    path = str(q.store.path)
    done = subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]  # no retry allowed: the lock must be free at once
    with q.store.reading():
        assert q.store.run("other-process")["status"] == "running"
        assert q.why(doc_id, "run-a")["verdict"] == "kept"  # nested questions share the attachment
    q.store.finish_run("other-process", "completed")  # a writer in this process right after a question
    assert q.store.run("other-process")["status"] == "completed"
