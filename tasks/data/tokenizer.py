"""Tokenizer: train a byte-level BPE tokenizer with HF ``tokenizers`` on a deterministic sample of kept docs."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from storage.artifacts import StageContext
from storage.hashing import unit_interval
from storage.shards import iter_batches
from tasks.config import TokenizerConfig
from tasks.errors import UserError

VERSION = "1"
TOKENIZER_FILE = "tokenizer.json"


def _texts(doc_paths: list[Path], cfg: TokenizerConfig, held_out: bool) -> Iterator[str]:
    """The training sample (``held_out=False``) or the held-out documents used to measure compression."""
    for batch in iter_batches(doc_paths, columns=["doc_id", "text"]):
        for doc_id, text in zip(batch.column("doc_id").to_pylist(), batch.column("text").to_pylist(), strict=True):
            if (unit_interval(doc_id, "tokenizer-holdout") < cfg.holdout_fraction) != held_out:
                continue
            if (
                held_out
                or cfg.sample_fraction >= 1.0
                or unit_interval(doc_id, "tokenizer-sample") < cfg.sample_fraction
            ):
                yield text


def compression(tokenizer: Tokenizer, texts: Iterator[str], max_docs: int = 2000) -> dict:
    """UTF-8 bytes per token on held-out text: how much the tokenizer compresses text it did not train on."""
    n_bytes = n_tokens = n_docs = 0
    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(tokenizer.encode(text, add_special_tokens=False).ids)
        n_docs += 1
        if n_docs >= max_docs:
            break
    return {
        "heldout_docs": n_docs,
        "heldout_bytes": n_bytes,
        "heldout_tokens": n_tokens,
        "bytes_per_token": round(n_bytes / n_tokens, 4) if n_tokens else None,
    }


def new_bpe(cfg: TokenizerConfig) -> tuple[Tokenizer, trainers.BpeTrainer]:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=cfg.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tokenizer, trainer


def train_tokenizer(doc_paths: list[Path], cfg: TokenizerConfig, ctx: StageContext) -> dict:
    """Write ``tokenizer.json`` (trained, or copied from ``cfg.pretrained``)."""
    out = ctx.out_dir / TOKENIZER_FILE
    if cfg.pretrained:
        source = Path(cfg.pretrained).expanduser()
        if not source.is_file():
            raise UserError(f"tokenizer.pretrained: {source} is not a file")
        shutil.copyfile(source, out)
    else:
        tokenizer, trainer = new_bpe(cfg)
        tokenizer.train_from_iterator(_texts(doc_paths, cfg, held_out=False), trainer)
        tokenizer.save(str(out))
    tokenizer = Tokenizer.from_file(str(out))
    missing = [t for t in cfg.special_tokens if tokenizer.token_to_id(t) is None]
    if missing:
        raise UserError(f"tokenizer lacks special tokens {missing}; add them or change tokenizer.special_tokens")
    return {
        "vocab_size": tokenizer.get_vocab_size(),
        "eot_id": tokenizer.token_to_id(cfg.special_tokens[0]),
        **compression(tokenizer, _texts(doc_paths, cfg, held_out=True)),
    }


def load_tokenizer(folder: Path) -> Tokenizer:
    return Tokenizer.from_file(str(folder / TOKENIZER_FILE))
