"""Offline probes built from held-out documents (no downloads): LAMBADA-style last word, HellaSwag-style choice.

* **Last word** (after LAMBADA): a chunk of ``block_size`` tokens of a held-out document, cut just after its
  last complete word (a token starting with a space and letters, plus its letter/digit continuation tokens).
  ``last_token_accuracy``: the greedy next token after the context is the word's first token.
  ``last_word_accuracy``: greedy decoding reproduces every token of the word (checked under teacher forcing,
  which is equivalent for greedy decoding). Chance is not a fixed number for an open vocabulary, so the
  unigram and bigram baselines answer the same items.
* **Multiple choice** (after HellaSwag): a context from one held-out document; the choices are its true
  next ``continuation_tokens`` tokens and continuations of the same length from *other* held-out documents.
  ``accuracy`` picks the highest total log-likelihood, ``accuracy_norm`` the highest log-likelihood per
  UTF-8 byte of the continuation (lm-evaluation-harness's ``acc_norm``). Chance = 1 / choices.

Items are chunks of the held-out documents, drawn with a seeded generator and capped, so a probe costs a
bounded, deterministic amount of work.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from tasks.evaluation.baselines import KneserNeyBigram, Unigram
from tasks.modeling.gpt import GPT, KVCache

WORD_START = re.compile(r"^Ġ[A-Za-z]+$")  # byte-level BPE: Ġ is the space byte
WORD_PIECE = re.compile(r"^[A-Za-z0-9]+$")
MIN_CONTEXT = 8


@dataclass
class Scored:
    """Per-position log-probabilities of the actual next tokens and the greedy predictions, for one sequence."""

    log_probs: np.ndarray  # [n - 1]
    greedy: np.ndarray  # [n - 1]


@torch.no_grad()
def score_sequences(model: GPT, sequences: list[np.ndarray], batch_size: int, device: torch.device) -> list[Scored]:
    """Teacher-forced scoring of many short sequences (each ≤ block_size), right-padded into batches."""
    out: list[Scored] = []
    for start in range(0, len(sequences), batch_size):
        group = sequences[start : start + batch_size]
        width = max(len(s) for s in group)
        data = torch.zeros(len(group), width, dtype=torch.long)
        for row, seq in enumerate(group):
            data[row, : len(seq)] = torch.from_numpy(seq.astype(np.int64))
        data = data.to(device)
        logits, _ = model(data[:, :-1])
        log_probs = F.log_softmax(logits.float(), dim=-1)
        picked = log_probs.gather(-1, data[:, 1:, None]).squeeze(-1).cpu().numpy()
        greedy = logits.argmax(dim=-1).cpu().numpy()
        out += [Scored(picked[r, : len(s) - 1], greedy[r, : len(s) - 1]) for r, s in enumerate(group)]
    return out


@torch.no_grad()
def score_choices(
    model: GPT, items: list[tuple[np.ndarray, list[np.ndarray]]], batch_size: int, device: torch.device
) -> list[np.ndarray]:
    """Log-probabilities (choices, continuation tokens) per item: each context is encoded once, into a KV
    cache that every choice then continues from (contexts and continuations have fixed lengths)."""
    out: list[np.ndarray] = []
    n_choices = len(items[0][1])
    per_batch = max(batch_size // n_choices, 1)
    for start in range(0, len(items), per_batch):
        group = items[start : start + per_batch]
        context = torch.from_numpy(np.stack([ctx for ctx, _ in group]).astype(np.int64)).to(device)
        choices = torch.from_numpy(np.stack([c for _, cs in group for c in cs]).astype(np.int64)).to(device)
        cache = KVCache(model.cfg.n_layer)
        logits, _ = model(context, cache=cache)
        cache.repeat_interleave(n_choices)
        first = logits[:, -1:, :].repeat_interleave(n_choices, dim=0)
        rest, _ = model(choices[:, :-1], cache=cache)
        log_probs = F.log_softmax(torch.cat([first, rest], dim=1).float(), dim=-1)
        picked = log_probs.gather(-1, choices[:, :, None]).squeeze(-1).cpu().numpy()
        out += list(picked.reshape(len(group), n_choices, -1))
    return out


def _chunks(docs: list[np.ndarray], length: int) -> list[tuple[int, np.ndarray]]:
    """Non-overlapping chunks of ``length`` tokens of every document, as (document index, tokens)."""
    return [(d, doc[s : s + length]) for d, doc in enumerate(docs) for s in range(0, len(doc) - length + 1, length)]


def _sample(items: list, n: int, rng: np.random.Generator) -> list:
    if len(items) <= n:
        return items
    return [items[i] for i in sorted(rng.choice(len(items), size=n, replace=False))]


def last_word_items(
    docs: list[np.ndarray], tokenizer: Tokenizer, block_size: int, n_items: int, seed: int
) -> list[tuple[np.ndarray, int]]:
    """(sequence, index where its final word starts) per item; the sequence ends with that word."""
    vocab = [tokenizer.id_to_token(i) or "" for i in range(tokenizer.get_vocab_size())]
    starts = np.array([bool(WORD_START.match(t)) for t in vocab])
    pieces = np.array([bool(WORD_PIECE.match(t)) for t in vocab])
    items = []
    for _, chunk in _chunks(docs, block_size) or [(d, doc) for d, doc in enumerate(docs)]:
        chunk = chunk[:block_size]
        # a word = a start token plus continuation pieces, followed by something that is not a piece
        for begin in range(len(chunk) - 2, MIN_CONTEXT - 1, -1):
            if not starts[chunk[begin]]:
                continue
            end = begin + 1
            while end < len(chunk) and pieces[chunk[end]]:
                end += 1
            if end < len(chunk) and len(tokenizer.decode(chunk[begin:end].tolist()).strip()) >= 3:
                items.append((chunk[:end].copy(), begin))
                break
    return _sample(items, n_items, np.random.default_rng([seed, 1]))


def multiple_choice_items(
    docs: list[np.ndarray], context_tokens: int, continuation_tokens: int, n_choices: int, n_items: int, seed: int
) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """(context, choices) per item; choice 0 is the true continuation, the rest come from other documents."""
    rng = np.random.default_rng([seed, 2])
    chunks = _chunks(docs, context_tokens + continuation_tokens)
    if len({d for d, _ in chunks}) < 2:
        return []
    items = []
    for doc, chunk in _sample(chunks, n_items, rng):
        true = chunk[context_tokens:]
        choices = [true]
        for j in rng.permutation(len(chunks)):
            other_doc, other = chunks[j]
            candidate = other[context_tokens:]
            if other_doc != doc and not any(np.array_equal(candidate, c) for c in choices):
                choices.append(candidate)
            if len(choices) == n_choices:
                break
        if len(choices) == n_choices:
            items.append((chunk[:context_tokens], choices))
    return items


def run_last_word(
    model: GPT,
    items: list[tuple[np.ndarray, int]],
    baselines: list[Unigram | KneserNeyBigram],
    batch_size: int,
    device: torch.device,
) -> dict:
    if not items:
        return {"items": 0}
    scored = score_sequences(model, [seq for seq, _ in items], batch_size, device)
    result: dict = {"items": len(items), "target": "final word of a held-out chunk (greedy, exact tokens)"}
    # greedy predictions at the target positions only (begin - 1 … end - 2)
    predicted = {"model": [s.greedy[begin - 1 :] for s, (_, begin) in zip(scored, items, strict=True)]}
    for b in baselines:
        predicted[b.name] = [b.argmax_next(seq[begin - 1 : -1]) for seq, begin in items]
    for name, greedy in predicted.items():
        first = [g[0] == seq[begin] for g, (seq, begin) in zip(greedy, items, strict=True)]
        whole = [np.array_equal(g, seq[begin:]) for g, (seq, begin) in zip(greedy, items, strict=True)]
        result[name] = {"last_token_accuracy": float(np.mean(first)), "last_word_accuracy": float(np.mean(whole))}
    return result


def run_multiple_choice(
    model: GPT,
    items: list[tuple[np.ndarray, list[np.ndarray]]],
    baselines: list[Unigram | KneserNeyBigram],
    byte_lengths: np.ndarray,
    batch_size: int,
    device: torch.device,
) -> dict:
    if not items:
        return {"items": 0}
    n_choices = len(items[0][1])
    scorers = {"model": score_choices(model, items, batch_size, device)}
    for b in baselines:
        scorers[b.name] = [
            np.stack([b.log_prob(np.concatenate([ctx[-1:], c[:-1]]), c) for c in choices]) for ctx, choices in items
        ]
    result: dict = {"items": len(items), "choices": n_choices, "chance": 1.0 / n_choices}
    for name, log_probs in scorers.items():
        correct = correct_norm = 0
        for i, (_, choices) in enumerate(items):
            totals = log_probs[i].sum(axis=1)
            per_byte = totals / np.array([max(int(byte_lengths[c].sum()), 1) for c in choices])
            correct += int(totals[0] > totals[1:].max())  # a tie counts as wrong
            correct_norm += int(per_byte[0] > per_byte[1:].max())
        result[name] = {"accuracy": correct / len(items), "accuracy_norm": correct_norm / len(items)}
    return result


LM_EVAL_COMMON = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
target_delimiter: ""
"""
LM_EVAL_TASKS = {
    "tokenmill_multiple_choice": """output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "tokenmill_last_word": """output_type: loglikelihood
doc_to_text: context
doc_to_target: target
metric_list:
  - metric: perplexity
  - metric: acc
""",
}


def write_lm_eval_tasks(
    folder: Path,
    tokenizer: Tokenizer,
    words: list[tuple[np.ndarray, int]],
    choices: list[tuple[np.ndarray, list[np.ndarray]]],
    seed: int,
) -> None:
    """The same probe items as lm-evaluation-harness tasks: one JSONL file and one task YAML per probe.

    Texts are the decoded tokens (choices are shuffled with a seeded generator, ``label`` is the true one).
    ``data_files`` is relative: run ``lm_eval --include_path .`` from inside ``folder`` (docs/evaluation.md).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 3])
    rows = {"tokenmill_last_word": [], "tokenmill_multiple_choice": []}
    for seq, begin in words:
        context, target = tokenizer.decode(seq[:begin].tolist()), tokenizer.decode(seq[begin:].tolist())
        rows["tokenmill_last_word"].append({"context": context, "target": target})
    for context, options in choices:
        order = rng.permutation(len(options))
        rows["tokenmill_multiple_choice"].append(
            {
                "context": tokenizer.decode(context.tolist()),
                "choices": [tokenizer.decode(options[i].tolist()) for i in order],
                "label": int(np.flatnonzero(order == 0)[0]),
            }
        )
    for task, items in rows.items():
        if not items:
            continue
        with open(folder / f"{task}.jsonl", "w") as fh:
            fh.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
        body = f"task: {task}\n" + LM_EVAL_COMMON.format(data=f"{task}.jsonl") + LM_EVAL_TASKS[task]
        (folder / f"{task}.yaml").write_text(body)
