"""Evaluate: whole-split metrics per source against unigram and bigram baselines, probes and samples.

Every token of a split except each shard's first is predicted exactly once: shards are cut into windows of
``block_size + 1`` tokens with stride ``block_size`` and a final shorter window, evaluated in batches (so a
token sees between 0 and block_size - 1 tokens of context; no random sampling). Each predicted token is
attributed to its document's source through the tokenize ledger's token spans. Bits-per-byte divides total
nats by ln 2 and by the UTF-8 bytes the predicted tokens stand for, so it is comparable across tokenizers.
The baselines (``tasks.evaluation.baselines``) score exactly the same predicted tokens; the probes
(``tasks.evaluation.probes``) are built from the test split. ``report.json`` holds everything; ``report.md`` renders it.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from storage.artifacts import StageContext
from storage.shards import read_token_shard
from tasks.config import EvaluateConfig
from tasks.evaluation.baselines import KneserNeyBigram, Unigram, fit_baselines
from tasks.evaluation.probes import (
    last_word_items,
    multiple_choice_items,
    run_last_word,
    run_multiple_choice,
    write_lm_eval_tasks,
)
from tasks.modeling.gpt import GPT
from tasks.modeling.weights import load_model
from tasks.reporting.report import metrics_markdown, samples_markdown

VERSION = "2"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
UNATTRIBUTED = "(unattributed)"
MC_CONTINUATION_TOKENS = 16
MC_CHOICES = 4


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
def token_nll(model: GPT, tokens: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """Negative log-likelihood (nats) of every token given the tokens before it in its window; NaN at 0."""
    block = model.cfg.block_size
    nll = np.full(len(tokens), np.nan)
    spans = _windows(len(tokens), block)
    full = [s for s in spans if s[1] - s[0] == block + 1]
    groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[s] for s in spans if s[1] - s[0] != block + 1]
    for group in groups:
        data = torch.from_numpy(np.stack([tokens[a:b].astype(np.int64) for a, b in group])).to(device)
        logits, _ = model(data[:, :-1])
        flat = F.cross_entropy(logits.float().flatten(0, 1), data[:, 1:].flatten(), reduction="none")
        losses = flat.view(len(group), -1).cpu().numpy()
        for (a, b), row in zip(group, losses, strict=True):
            nll[a + 1 : b] = row
    return nll


def document_spans(ledger_files: list[Path]) -> dict[str, list[dict]]:
    """The tokenize ledger's kept documents per shard: doc_id, source, token_start, token_end (in order)."""
    by_shard: dict[str, list[dict]] = defaultdict(list)
    if not ledger_files:
        return by_shard
    columns = ["doc_id", "source", "shard", "token_start", "token_end"]
    for row in pq.read_table(ledger_files, columns=columns).to_pylist():
        if row["shard"] is not None:
            by_shard[row["shard"]].append(row)
    for rows in by_shard.values():
        rows.sort(key=lambda r: r["token_start"])
    return by_shard


def split_documents(tokens: np.ndarray, spans: list[dict], eot: int) -> list[tuple[str, np.ndarray]]:
    """(source, tokens ending with its end-of-text separator) per document of a shard; EOT-cut if no ledger."""
    if spans:
        return [(r["source"], tokens[r["token_start"] : r["token_end"]]) for r in spans]
    cuts = np.flatnonzero(tokens == eot) + 1
    return [(UNATTRIBUTED, doc) for doc in np.split(tokens, cuts) if len(doc)]


def _strip_eot(doc: np.ndarray, eot: int) -> np.ndarray:
    return doc[:-1] if len(doc) and doc[-1] == eot else doc


class Totals:
    """Summed nats per scorer, tokens and bytes: the sufficient statistics of loss, perplexity and bits/byte."""

    def __init__(self) -> None:
        self.nats: dict[str, float] = defaultdict(float)
        self.tokens = 0
        self.bytes = 0

    def add(self, nats: dict[str, np.ndarray], n_bytes: np.ndarray) -> None:
        for name, values in nats.items():
            self.nats[name] += float(values.sum())
        self.tokens += len(n_bytes)
        self.bytes += int(n_bytes.sum())

    def metrics(self) -> dict:
        out: dict = {"tokens": self.tokens, "bytes": self.bytes}
        if not self.tokens:
            return out
        for name, nats in self.nats.items():
            out[name] = {
                "loss": nats / self.tokens,
                "perplexity": math.exp(min(nats / self.tokens, 700)),
                "bits_per_byte": nats / math.log(2) / max(self.bytes, 1),
            }
        return out


def split_metrics(
    model: GPT,
    shards: list[Path],
    spans: dict[str, list[dict]],
    baselines: list[Unigram | KneserNeyBigram],
    byte_lengths: np.ndarray,
    cfg: EvaluateConfig,
    device: torch.device,
) -> dict:
    """Model and baseline metrics over every predicted token of a split, overall and per source."""
    overall, per_source = Totals(), defaultdict(Totals)
    budget = cfg.max_tokens_per_split
    for path in shards:
        tokens = read_token_shard(path)
        if budget is not None:
            tokens = tokens[: max(budget + 1, 0)]
            budget -= max(len(tokens) - 1, 0)
        if len(tokens) < 2:
            continue
        targets = tokens[1:].astype(np.int64)
        nats = {"model": token_nll(model, tokens, cfg.batch_size, device)[1:]}
        for b in baselines:
            nats[b.name] = -b.log_prob(tokens[:-1].astype(np.int64), targets)
        n_bytes = byte_lengths[targets]
        overall.add(nats, n_bytes)
        owner = np.full(len(tokens), -1, dtype=np.int64)
        sources = sorted({r["source"] for r in spans.get(path.stem, [])})
        for r in spans.get(path.stem, []):
            owner[r["token_start"] : r["token_end"]] = sources.index(r["source"])
        owner = owner[1:]
        for k, source in enumerate([*sources, UNATTRIBUTED]):
            mask = owner == (k if k < len(sources) else -1)
            if mask.any():
                per_source[source].add({n: v[mask] for n, v in nats.items()}, n_bytes[mask])
    result = overall.metrics()
    if set(per_source) != {UNATTRIBUTED}:
        result["sources"] = {source: t.metrics() for source, t in sorted(per_source.items())}
    return result


def held_out_documents(shards: list[Path], spans: dict[str, list[dict]], eot: int) -> list[np.ndarray]:
    docs = []
    for path in shards:
        tokens = read_token_shard(path)
        docs += [_strip_eot(doc, eot) for _, doc in split_documents(tokens, spans.get(path.stem, []), eot)]
    return [d for d in docs if len(d)]


def run_probes(
    model: GPT,
    tokenizer: Tokenizer,
    docs: list[np.ndarray],
    baselines: list[Unigram | KneserNeyBigram],
    byte_lengths: np.ndarray,
    cfg: EvaluateConfig,
    seed: int,
    device: torch.device,
    lm_eval_dir: Path | None = None,
) -> dict:
    """Both probes on items from ``docs``; with ``lm_eval_dir``, also write them as lm-evaluation-harness tasks."""
    block = model.cfg.block_size
    if cfg.probe_items == 0:
        return {}
    words = last_word_items(docs, tokenizer, block, cfg.probe_items, seed)
    continuation = min(MC_CONTINUATION_TOKENS, block // 2)
    choices = multiple_choice_items(docs, block - continuation, continuation, MC_CHOICES, cfg.probe_items, seed)
    if lm_eval_dir is not None:
        write_lm_eval_tasks(lm_eval_dir, tokenizer, words, choices, seed)
    return {
        "last_word": run_last_word(model, words, baselines, cfg.batch_size, device),
        "multiple_choice": run_multiple_choice(model, choices, baselines, byte_lengths, cfg.batch_size, device)
        | {"continuation_tokens": continuation, "context_tokens": block - continuation},
    }


def default_prompts(docs: list[np.ndarray], tokenizer: Tokenizer, n: int, prompt_tokens: int = 6) -> list[str]:
    """Openings of the first held-out documents: prompts that fit whatever the corpus is."""
    return [tokenizer.decode(doc[:prompt_tokens].tolist()) for doc in docs[:n]]


def samples(
    model: GPT, tokenizer: Tokenizer, prompts: list[str], cfg: EvaluateConfig, seed: int, eot: int, device: torch.device
) -> list[dict]:
    """One seeded, KV-cached sample per prompt (prompts repeat until ``cfg.samples`` are drawn)."""
    out = []
    for i, prompt in enumerate((prompts * cfg.samples)[: cfg.samples] if prompts else []):
        generator = torch.Generator(device=device).manual_seed(seed + i)
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids[-model.cfg.block_size :] or [eot]
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        result = model.generate(
            idx, cfg.sample_tokens, cfg.temperature, cfg.top_k, generator, stop_token=eot, top_p=cfg.top_p
        )
        out.append({"prompt": prompt, "completion": tokenizer.decode(result[0, len(ids) :].tolist()), "seed": seed + i})
    return out


def render_markdown(report: dict) -> str:
    """The evaluate artifact's own report (the per-run report in ``tasks.reporting.report`` adds data and history)."""
    return "\n".join(["# tokenmill evaluation", "", metrics_markdown(report), samples_markdown(report["samples"])])


def evaluate(
    model_dir: Path,
    tokenizer_dir: Path,
    shards: dict[str, list[Path]],
    eot: int,
    cfg: EvaluateConfig,
    seed: int,
    ctx: StageContext,
    ledger_files: list[Path] | None = None,
) -> dict:
    """Write ``report.json`` and ``report.md``; return the headline metrics per split (the manifest counts)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_dir, device)
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    if tokenizer.get_vocab_size() != model.cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_dir} has {tokenizer.get_vocab_size()} tokens but model {model_dir} was trained "
            f"with vocab_size {model.cfg.vocab_size}: pass the tokenizer the model was trained with"
        )
    torch.manual_seed(seed)
    byte_lengths = token_byte_lengths(tokenizer)
    baselines = fit_baselines(shards.get("train", []), tokenizer.get_vocab_size())
    spans = document_spans(ledger_files or [])
    ctx.progress(0.05, "baselines fitted")
    splits = {}
    for n, split in enumerate(("val", "test")):
        splits[split] = split_metrics(model, shards.get(split, []), spans, baselines, byte_lengths, cfg, device)
        ctx.progress(0.3 + 0.3 * n, f"{split}: {splits[split]['tokens']:,} tokens scored")
    probe_split = "test" if shards.get("test") else "val"
    docs = held_out_documents(shards.get(probe_split, []), spans, eot)
    prompts = cfg.prompts or default_prompts(docs, tokenizer, max(cfg.samples, 1))
    report = {
        "splits": splits,
        "baselines": {b.name: b.description for b in baselines},
        "probes": run_probes(
            model, tokenizer, docs, baselines, byte_lengths, cfg, seed, device, ctx.out_dir / "lm_eval"
        )
        | {"split": probe_split},
        "samples": samples(model, tokenizer, prompts, cfg, seed, eot, device),
        "model": model.cfg.to_dict() | {"params": model.num_params()},
        "method": {
            "windows": f"non-overlapping windows of {model.cfg.block_size} predicted tokens, batch {cfg.batch_size}",
            "max_tokens_per_split": cfg.max_tokens_per_split,
        },
    }
    (ctx.out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2, sort_keys=True))
    (ctx.out_dir / REPORT_MD).write_text(render_markdown(report))
    return headline_counts(report)


def headline_counts(report: dict) -> dict:
    """Flat per-split numbers for the manifest (what ``tokenmill show`` prints)."""
    counts = {}
    for split, m in report["splits"].items():
        if not m.get("tokens"):
            counts[split] = {"tokens": 0}
            continue
        counts[split] = {"tokens": m["tokens"], "bytes": m["bytes"]} | {
            (key if scorer == "model" else f"{scorer}_{key}"): value
            for scorer in ("model", "unigram", "bigram")
            for key, value in m[scorer].items()
            if scorer == "model" or key != "perplexity"
        }
    probes = report["probes"]
    counts["probes"] = {
        f"{probe}_{metric}": value
        for probe in ("last_word", "multiple_choice")
        for metric, value in (probes.get(probe, {}).get("model") or {}).items()
    }
    if probes.get("multiple_choice", {}).get("items"):
        counts["probes"]["multiple_choice_chance"] = probes["multiple_choice"]["chance"]
    return counts
