"""Language identification in clean: per-document language and score in the ledger, drops as language:<code>."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from storage.artifacts import StageContext
from tasks.config import CleanConfig, SourceConfig
from tasks.data.clean import clean, clean_batch
from tasks.data.ingest import ingest
from tasks.errors import UserError

# A tiny multilingual corpus: one paragraph per language, written for these tests.
PARAGRAPHS = {
    "en": "The committee met on Tuesday to discuss the budget for the coming year. After a long debate the members "
    "agreed to postpone the vote until next month, because several of them were travelling and could not attend.",
    "fr": "Le comité s'est réuni mardi pour discuter du budget de l'année prochaine. Après un long débat, les membres "
    "ont décidé de reporter le vote au mois prochain, car plusieurs d'entre eux étaient en voyage.",
    "de": "Der Ausschuss trat am Dienstag zusammen, um den Haushalt für das kommende Jahr zu beraten. Nach einer "
    "langen "
    "Debatte beschlossen die Mitglieder, die Abstimmung auf den nächsten Monat zu verschieben.",
    "es": "El comité se reunió el martes para discutir el presupuesto del próximo año. Después de un largo debate, los "
    "miembros acordaron aplazar la votación hasta el mes que viene, porque varios estaban de viaje.",
    "it": "Il comitato si è riunito martedì per discutere il bilancio del prossimo anno. Dopo un lungo dibattito i "
    "membri hanno deciso di rinviare il voto al mese prossimo, perché molti di loro erano in viaggio.",
}
CODE = "def total(items):\n    # Somme des prix, taxes comprises\n    return sum(item.price for item in items)\n" * 3

# Gopher stop words are English: off here so the other languages are judged by language alone
LOOSE = {"prose": {"gopher_quality": {"min_words": 10, "min_stop_words": 0}, "gopher_repetition": {"enabled": False}}}


def _run(cfg: CleanConfig, texts: list[str], sources: list[str] | None = None, locators: list[str] | None = None):
    n = len(texts)
    return clean_batch(texts, sources or ["s"] * n, locators or ["doc.txt"] * n, cfg)


def test_languages_outside_the_allowed_list_are_dropped_with_their_code_and_score():
    out = _run(CleanConfig(presets=LOOSE), list(PARAGRAPHS.values()))
    assert out.reason == [None, "language:fr", "language:de", "language:es", "language:it"]
    scores = [dict(m) for m in out.scores.to_pylist()]
    for code, row in zip(PARAGRAPHS, scores, strict=True):
        assert row[f"language.{code}"] == row["language.score"] > 0.65  # the identified language and its probability
        assert row["language.min_score"] == 0.65
    assert scores[0]["language.allowed_score"] == scores[0]["language.score"]
    assert all(s["language.allowed_score"] < 0.1 for s in scores[1:])
    assert out.score[1] == scores[1]["language.allowed_score"]  # the drop's score is what was compared


def test_allowed_languages_a_min_score_and_the_any_language_setting():
    texts = list(PARAGRAPHS.values())
    out = _run(CleanConfig(presets=LOOSE, languages=["en", "fr", "de"]), texts)
    assert out.reason == [None, None, None, "language:es", "language:it"]
    assert _run(CleanConfig(presets=LOOSE, languages=[]), texts).keep.all()  # identified and recorded, not dropped
    strict = _run(CleanConfig(presets=LOOSE, min_language_score=0.999999), texts[:1])
    assert strict.reason == ["language:en"]  # an allowed language below the least score is dropped too


def test_code_presets_are_exempt_and_rules_can_be_set_per_preset_and_per_source():
    cfg = CleanConfig(
        presets=LOOSE | {"docs_fr": {"language": {"languages": ["fr"]}}},
        preset_by_source={"lefrancais": "docs_fr"},
        language_by_source={"anything": {"languages": []}, "raw": {"exempt": True}},
    )
    texts = [CODE, PARAGRAPHS["fr"], PARAGRAPHS["en"], PARAGRAPHS["de"], PARAGRAPHS["it"]]
    out = _run(cfg, texts, ["s", "lefrancais", "lefrancais", "anything", "raw"], ["m.py", *["a.txt"] * 4])
    assert out.reason[:3] == [None, None, "language:en"]
    assert out.keep[3] and out.keep[4]
    scores = [dict(m) for m in out.scores.to_pylist()]
    assert not any(k.startswith("language.") for k in scores[0])  # code: not identified at all
    assert not any(k.startswith("language.") for k in scores[4])  # exempt source
    assert scores[3]["language.de"] > 0.65


def test_unknown_language_codes_fail_before_any_work(tmp_path: Path):
    with pytest.raises(UserError, match=r"\['xx'\].*ISO 639-1"):
        clean(
            [], CleanConfig(languages=["en", "xx"]), StageContext(tmp_path / "out", tmp_path / "work", lambda m: None)
        )


def test_clean_stage_writes_language_scores_and_reasons_to_the_ledger(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for code, text in PARAGRAPHS.items():
        (corpus / f"{code}.txt").write_text(text)
    raw = tmp_path / "ingest"
    ingest(
        [SourceConfig(name="news", path=str(corpus))],
        StageContext(raw, tmp_path / "w1", lambda m: None),
        tmp_path / "cache",
    )
    out = tmp_path / "clean"
    counts = clean(
        sorted((raw / "docs").glob("*.parquet")), CleanConfig(presets=LOOSE), StageContext(out, tmp_path / "w2", print)
    )
    assert counts["dropped"] == {f"language:{c}": 1 for c in ("de", "es", "fr", "it")}
    assert counts["bytes_in"] == sum(len(t.encode()) for t in PARAGRAPHS.values())
    assert counts["dropped_bytes"]["language:fr"] == len(PARAGRAPHS["fr"].encode())
    assert {"reason": "language:*", "stat": "language.allowed_score", "low": None, "high": None} in counts["rules"][
        "prose"
    ]
    ledger = pq.read_table(out / "ledger").to_pylist()
    by_locator = {r["locator"].rsplit("/", 1)[-1]: r for r in ledger}
    assert by_locator["fr.txt"]["reason"] == "language:fr" and by_locator["fr.txt"]["fate"] == "dropped"
    assert dict(by_locator["en.txt"]["scores"])["language.en"] > 0.9
