"""The documentation preset keeps reference pages prose drops, still drops junk; the audit shows each rule's effect."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from benchmarks.docs_corpus import reference_page
from storage.artifacts import StageContext
from tasks.config import CleanConfig, SourceConfig
from tasks.data.audit import audit
from tasks.data.clean import clean_batch, preset_for
from tasks.data.ingest import ingest
from tests.data.test_language import PARAGRAPHS


def _reference(module: str, file: str) -> str:
    """The API reference page of a standard-library module, built from its docstrings (real documentation)."""
    return reference_page(module, (Path(sysconfig.get_paths()["stdlib"]) / file).read_text())


# Among the most-used reference pages; the prose preset drops each of them as gopher_dup_5gram.
REFERENCE = _reference("threading", "threading.py")
MORE_REFERENCE = [_reference("logging", "logging/__init__.py"), _reference("shutil", "shutil.py")]
SPAM = "Buy cheap watches online today, the best watches at the best prices for you.\n" * 40


def test_rst_md_and_rst_txt_files_get_the_docs_preset_by_extension():
    cfg = CleanConfig()
    assert [preset_for("s", f"s/{n}", cfg) for n in ("a.rst", "b.md", "c.rst.txt", "d.txt", "e.py")] == [
        "docs", "docs", "docs", "prose", "code",
    ]  # fmt: skip


def test_docs_preset_keeps_reference_phrasing_that_prose_drops_and_still_drops_junk():
    cfg = CleanConfig()
    pages = [REFERENCE, *MORE_REFERENCE]
    prose_out = clean_batch(pages, ["s"] * 3, ["api.txt"] * 3, cfg)
    assert all(r is not None and r.startswith("gopher_dup_") for r in prose_out.reason)
    docs_out = clean_batch([*pages, SPAM, PARAGRAPHS["fr"] * 3], ["s"] * 5, ["api.rst"] * 3 + ["spam.md", "fr.md"], cfg)
    assert docs_out.reason[:3] == [None, None, None]
    assert docs_out.reason[3].startswith("gopher_")  # spam
    assert docs_out.reason[4] == "language:fr"  # the lower language bound of docs still refuses other languages


def test_audit_counts_breaks_drops_bytes_and_shows_threshold_quantiles_and_examples(tmp_path: Path):
    corpus = tmp_path / "docs"
    corpus.mkdir()
    (corpus / "api.rst").write_text(REFERENCE)
    (corpus / "spam.md").write_text(SPAM)
    (corpus / "notes.txt").write_text(REFERENCE)  # prose: dropped as gopher_dup_*
    (corpus / "fr.txt").write_text(PARAGRAPHS["fr"] * 2)
    out = tmp_path / "ingest"
    ingest([SourceConfig(name="docs", path=str(corpus))], StageContext(out, tmp_path / "w", print), tmp_path / "c")
    report = audit(sorted((out / "docs").glob("*.parquet")), CleanConfig())
    assert report["docs"] == 4 and report["kept"] == 1
    assert report["bytes"] == sum(len(p.read_bytes()) for p in corpus.iterdir())
    assert report["bytes_kept"] == len(REFERENCE.encode())
    prose = {r["reason"]: r for r in report["presets"]["prose"]["rules"]}
    assert prose["language:*"]["drops"] == 1 and prose["language:*"]["examples"][0]["locator"].endswith("fr.txt")
    dup = [r for r in prose.values() if r["reason"].startswith("gopher_dup_") and r["drops"]]
    assert len(dup) == 1 and dup[0]["bytes_dropped"] == len(REFERENCE.encode())
    assert dup[0]["high"] is not None and set(dup[0]["quantiles"]) == {"0.05", "0.25", "0.5", "0.75", "0.95"}
    docs = {r["reason"]: r for r in report["presets"]["docs"]["rules"]}
    assert sum(r["drops"] for r in docs.values()) == 1  # spam.md
    assert all(r["breaks"] >= r["drops"] for r in [*prose.values(), *docs.values()])
