"""Evaluate: loss, perplexity and bits-per-byte over the whole val and test splits, against a unigram baseline.

Every token of a split except each shard's first is predicted exactly once: shards are cut into windows of
``block_size + 1`` tokens with stride ``block_size`` and a final shorter window, evaluated in batches.
Bits-per-byte divides total nats by ln 2 and by the UTF-8 bytes the predicted tokens stand for, so it is
comparable across tokenizers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from storage.artifacts import StageContext
from storage.shards import read_token_shard
from tasks.config import EvaluateConfig
from tasks.model import GPT
from tasks.train import load_model

VERSION = "1"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: visible character → byte value."""
    visible = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = visible[:]
    n = 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(visible, chars, strict=True)}


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens)."""
    inverse = _bytes_to_unicode()
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token, idx in tokenizer.get_vocab().items():
        if token not in specials:
            lengths[idx] = sum(1 for ch in token if ch in inverse)
    return lengths


def _windows(n_tokens: int, block_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + block_size + 1, n_tokens)) for s in range(0, max(n_tokens - 1, 0), block_size)]


@torch.no_grad()
def split_metrics(
    model: GPT,
    shards: list[Path],
    byte_lengths: np.ndarray,
    unigram_logp: np.ndarray,
    cfg: EvaluateConfig,
    device: torch.device,
) -> dict:
    """Summed negative log-likelihood of every predicted token of a split, for the model and the baseline."""
    block = model.cfg.block_size
    nll = base_nll = 0.0
    n_tokens = n_bytes = 0
    for path in shards:
        tokens = read_token_shard(path)
        if cfg.max_tokens_per_split is not None:
            tokens = tokens[: max(cfg.max_tokens_per_split - n_tokens + 1, 0)]
        spans = _windows(len(tokens), block)
        full = [s for s in spans if s[1] - s[0] == block + 1]
        groups = [full[i : i + cfg.batch_size] for i in range(0, len(full), cfg.batch_size)]
        groups += [[s] for s in spans if s[1] - s[0] != block + 1]
        for group in groups:
            data = torch.from_numpy(np.stack([tokens[a:b].astype(np.int64) for a, b in group]))
            x, y = data[:, :-1].to(device), data[:, 1:].to(device)
            logits, _ = model(x)
            nll += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
            targets = data[:, 1:].numpy().ravel()
            base_nll -= float(unigram_logp[targets].sum())
            n_tokens += targets.size
            n_bytes += int(byte_lengths[targets].sum())
    if n_tokens == 0:
        return {"tokens": 0}
    return {
        "tokens": n_tokens,
        "bytes": n_bytes,
        "loss": nll / n_tokens,
        "perplexity": math.exp(nll / n_tokens),
        "bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
        "unigram_loss": base_nll / n_tokens,
        "unigram_bits_per_byte": base_nll / math.log(2) / max(n_bytes, 1),
    }


def unigram_log_probs(train_shards: list[Path], vocab_size: int) -> np.ndarray:
    """Add-one smoothed unigram log-probabilities from the train split's token counts."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for path in train_shards:
        counts += np.bincount(read_token_shard(path), minlength=vocab_size)[:vocab_size]
    return np.log(counts / counts.sum())


def samples(
    model: GPT, tokenizer: Tokenizer, cfg: EvaluateConfig, seed: int, eot: int, device: torch.device
) -> list[dict]:
    out = []
    for i, prompt in enumerate((cfg.prompts * cfg.samples)[: cfg.samples]):
        generator = torch.Generator(device=device).manual_seed(seed + i)
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [eot]
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        result = model.generate(idx, cfg.sample_tokens, cfg.temperature, cfg.top_k, generator, stop_token=eot)
        out.append({"prompt": prompt, "completion": tokenizer.decode(result[0, len(ids) :].tolist())})
    return out


def render_markdown(report: dict) -> str:
    lines = [
        "# tokenmill evaluation",
        "",
        "| split | tokens | loss | perplexity | bits/byte | unigram loss | unigram bits/byte |",
        "|---|---|---|---|---|---|---|",
    ]
    for split, m in report["splits"].items():
        if m.get("tokens"):
            lines.append(
                f"| {split} | {m['tokens']:,} | {m['loss']:.4f} | {m['perplexity']:.2f} | {m['bits_per_byte']:.4f} "
                f"| {m['unigram_loss']:.4f} | {m['unigram_bits_per_byte']:.4f} |"
            )
    lines += ["", "## Samples", ""]
    for s in report["samples"]:
        lines += [f"**Prompt** `{s['prompt']!r}`", "", "```", s["prompt"] + s["completion"], "```", ""]
    return "\n".join(lines)


def evaluate(
    model_dir: Path,
    tokenizer_dir: Path,
    shards: dict[str, list[Path]],
    eot: int,
    cfg: EvaluateConfig,
    seed: int,
    ctx: StageContext,
) -> dict:
    """Write ``report.json`` and ``report.md``; return the headline metrics."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_dir, device)
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    byte_lengths = token_byte_lengths(tokenizer)
    unigram = unigram_log_probs(shards["train"], tokenizer.get_vocab_size())
    report = {
        "splits": {
            split: split_metrics(model, shards[split], byte_lengths, unigram, cfg, device) for split in ("val", "test")
        },
        "samples": samples(model, tokenizer, cfg, seed, eot, device),
    }
    (ctx.out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2, sort_keys=True))
    (ctx.out_dir / REPORT_MD).write_text(render_markdown(report))
    return {split: {k: v for k, v in m.items()} for split, m in report["splits"].items()}
