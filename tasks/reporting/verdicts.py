"""Whether the model is any good: its bits-per-byte against each baseline, and which recipe trained it.

Bits-per-byte, not loss per token, because it compares across tokenizers: the baselines share the model's
tokens, but a previous run may not (``comparable_per_token``).
"""

from __future__ import annotations

BASELINE_TITLES = {"unigram": "unigram", "bigram": "Kneser-Ney bigram"}


def verdicts(split_metrics: dict) -> list[dict]:
    """One verdict per baseline from headline counts (``bits_per_byte``, ``<baseline>_bits_per_byte``)."""
    model = split_metrics.get("bits_per_byte")
    out = []
    for name, title in BASELINE_TITLES.items():
        baseline = split_metrics.get(f"{name}_bits_per_byte")
        if model is None or baseline is None:
            continue
        out.append({"baseline": name, "title": title, "model": model, "value": baseline, "beats": model < baseline})
    return out


def verdict_text(split: str, split_metrics: dict) -> str:
    """E.g. ``val: beats the unigram by 1.2345 bits/byte (2.1000 vs 3.3345); LOSES to the Kneser-Ney bigram …``."""
    parts = []
    for v in verdicts(split_metrics):
        word = "beats" if v["beats"] else "LOSES to"
        parts.append(
            f"{word} the {v['title']} by {abs(v['value'] - v['model']):.4f} bits/byte "
            f"({v['model']:.4f} vs {v['value']:.4f})"
        )
    losing = [v["title"] for v in verdicts(split_metrics) if not v["beats"]]
    tail = f" — not a good model yet: it loses to the {' and the '.join(losing)}" if losing else ""
    return f"{split}: the model {'; '.join(parts)}{tail}"


def recipe_text(model: dict, train_params: dict | None) -> str:
    """Which recipe trained the model, e.g. ``modern (ReLU² MLP) + Muon + WSD schedule``."""
    arch = model.get("arch", "gpt2")
    text = "GPT-2" if arch == "gpt2" else f"modern ({'SwiGLU' if model.get('mlp') == 'swiglu' else 'ReLU²'} MLP)"
    if train_params:
        optimizer = {"adamw": "AdamW", "muon": "Muon + AdamW"}.get(train_params.get("optimizer", "adamw"), "?")
        schedule = {"cosine": "cosine", "wsd": "WSD"}.get(train_params.get("schedule", "cosine"), "?")
        align = ", document-aligned windows" if train_params.get("align") == "bos" else ""
        text += f" + {optimizer} + {schedule} schedule{align}"
    return text
