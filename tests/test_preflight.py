"""Checks before any stage: named paths exist, sources match files, and an emptied corpus stops before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from storage.artifacts import ArtifactStore
from storage.lineage import LineageStore
from tasks.errors import UserError
from tasks.preflight import preflight
from tasks.stages import run_all, run_stage
from tests.support.corpus import prose, tiny_config


def _rst_corpus(folder: Path) -> Path:
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        (folder / f"page{i}.rst.txt").write_text(prose(i))
    (folder / "sub" / "logo.png").write_bytes(b"\x89PNG")
    return folder


def test_a_missing_source_path_fails_before_any_stage(tmp_path: Path):
    cfg = tiny_config(tmp_path, tmp_path / "root", sources=[{"name": "docs", "path": str(tmp_path / "nowhere")}])
    with pytest.raises(UserError, match=r"sources\[0\] \('docs'\): .*nowhere does not exist; fix sources\[0\].path"):
        run_all(cfg, log=lambda m: None)
    assert not ArtifactStore(cfg.root).lineage_path.exists()  # no run was started


def test_a_source_matching_no_file_names_the_extensions_it_holds(tmp_path: Path):
    docs = _rst_corpus(tmp_path / "docs")
    source = {"name": "docs", "path": str(docs), "include_ext": [".rst"]}
    cfg = tiny_config(tmp_path, tmp_path / "root", sources=[source])
    with pytest.raises(UserError) as caught:
        preflight(cfg)
    message = str(caught.value)
    assert "no file under" in message and "ends with one of ['.rst']" in message
    assert "found .rst.txt (3), .png (1)" in message and "add '.rst.txt' to sources[0].include_ext" in message
    preflight(tiny_config(tmp_path, tmp_path / "root", sources=[source | {"include_ext": [".rst.txt"]}]))


def test_an_empty_source_folder_says_it_holds_no_files(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    cfg = tiny_config(tmp_path, tmp_path / "root", sources=[{"name": "e", "path": str(tmp_path / "empty")}])
    with pytest.raises(UserError, match="found no files at all"):
        preflight(cfg)


def test_a_missing_pretrained_tokenizer_fails_up_front(corpus: Path, tmp_path: Path):
    cfg = tiny_config(corpus, tmp_path / "root", tokenizer={"pretrained": str(tmp_path / "tok.json")})
    with pytest.raises(UserError, match="tokenizer.pretrained: .*tok.json is not a file"):
        run_all(cfg, log=lambda m: None)
    (tmp_path / "tok.json").write_text("{not a tokenizer")
    with pytest.raises(UserError, match="is not a tokenizers JSON file"):
        preflight(cfg)


def test_a_missing_dedup_against_fails_up_front(corpus: Path, tmp_path: Path):
    cfg = tiny_config(corpus, tmp_path / "root", dedup={"against": str(tmp_path / "old-dedup")})
    with pytest.raises(UserError, match="dedup.against: .*old-dedup is not a dedup artifact"):
        run_all(cfg, log=lambda m: None)
    assert not (tmp_path / "root" / "ingest").exists()


def test_a_corpus_where_every_document_is_dropped_stops_with_the_reasons(tmp_path: Path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"short{i}.txt").write_text(f"tiny {i}")
    cfg = tiny_config(tmp_path, tmp_path / "root", sources=[{"name": "docs", "path": str(docs)}])
    with pytest.raises(UserError) as caught:
        run_all(cfg, log=lambda m: None, run_id="emptied")
    message = str(caught.value)
    assert message.startswith("clean kept none of its 4 documents (") and "too_short" in message
    assert "so dedup has nothing to work on" in message and "\n" not in message
    lineage = LineageStore(ArtifactStore(cfg.root).lineage_path, read_only=True)
    assert lineage.run("emptied")["status"] == "failed"
    assert [r["stage"] for r in lineage.stage_runs("emptied")] == ["ingest", "clean", "dedup"]
    assert not (tmp_path / "root" / "tokenizer").exists()  # no tokenizer trained on nothing


def test_require_documents_passes_a_non_empty_corpus(config):
    manifests = {}
    for name in ("ingest", "clean"):
        manifests[name], _ = run_stage(name, config, dict(manifests), log=lambda m: None)
    assert json.loads(json.dumps(manifests["clean"].counts))["kept"] > 0
    run_stage("dedup", config, {"clean": manifests["clean"]}, log=lambda m: None)
