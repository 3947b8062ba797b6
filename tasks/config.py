"""The pipeline's parameters: one pydantic model, so the Prefect UI renders a form and bad values fail early."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STDLIB = "stdlib"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceConfig(Section):
    """One input: a folder of text files or JSONL files, named for lineage."""

    name: str = Field(description="Short source name, used in document ids and lineage.", pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(description="Folder or file to read; 'stdlib' means this Python's standard library sources.")
    kind: Literal["auto", "text", "jsonl"] = Field("auto", description="How to read files; 'auto' uses the extension.")
    include_ext: list[str] = Field(
        default=[".py", ".txt", ".md", ".rst", ".jsonl", ".jsonl.gz"],
        description="File extensions to read from a folder.",
    )
    exclude: list[str] = Field(default=[], description="Glob patterns (relative paths) to skip.")
    text_field: str = Field("text", description="JSONL field holding the document text.")
    max_files: int | None = Field(None, ge=1, description="Read at most this many files (sorted order).")
    max_file_bytes: int = Field(64 * 2**20, ge=1, description="Files larger than this are recorded as dropped.")

    def resolved_path(self) -> Path:
        if self.path == STDLIB:
            return Path(sysconfig.get_paths()["stdlib"])
        return Path(self.path).expanduser()


class CleanConfig(Section):
    """Quality filters: documents failing one are dropped with that reason in the ledger."""

    min_chars: int = Field(64, ge=0, description="Drop documents shorter than this after normalization.")
    max_chars: int = Field(500_000, ge=1, description="Drop documents longer than this.")
    max_line_chars: int = Field(
        1000, ge=1, description="Drop documents with a line longer than this (minified/generated)."
    )
    min_alnum_fraction: float = Field(
        0.25, ge=0, le=1, description="Drop documents with fewer alphanumeric characters."
    )

    @model_validator(mode="after")
    def _bounds(self) -> CleanConfig:
        if self.min_chars >= self.max_chars:
            raise ValueError(f"clean.min_chars ({self.min_chars}) must be below clean.max_chars ({self.max_chars})")
        return self


class DedupConfig(Section):
    """Duplicate removal across all sources."""

    exact: bool = Field(True, description="Remove documents whose normalized text is identical to an earlier one.")
    keep: Literal["first", "longest"] = Field("first", description="Which copy of a duplicate group is kept.")


class TokenizerConfig(Section):
    """The byte-level BPE tokenizer trained on the deduplicated corpus."""

    vocab_size: int = Field(4096, ge=260, le=2**20, description="BPE vocabulary size (including specials).")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a merge.")
    sample_fraction: float = Field(1.0, gt=0, le=1, description="Fraction of kept documents used for training.")
    special_tokens: list[str] = Field(default=["<|endoftext|>", "<|pad|>"], description="First is end-of-text.")
    pretrained: str | None = Field(None, description="Path of an existing tokenizer.json to use instead of training.")


class TokenizeConfig(Section):
    """Splitting documents into train/val/test and encoding them into token shards."""

    val_fraction: float = Field(0.05, ge=0, lt=0.5, description="Share of documents in the validation split.")
    test_fraction: float = Field(0.05, ge=0, lt=0.5, description="Share of documents in the test split.")
    shard_tokens: int = Field(8_000_000, ge=1024, description="Tokens per shard file.")
    batch_docs: int = Field(512, ge=1, description="Documents encoded per batch.")


class ModelConfig(Section):
    """The GPT architecture."""

    n_layer: int = Field(4, ge=1, le=96, description="Transformer blocks.")
    n_head: int = Field(4, ge=1, le=128, description="Attention heads per block; must divide n_embd.")
    n_embd: int = Field(128, ge=8, le=16384, description="Embedding width.")
    block_size: int = Field(128, ge=8, le=32768, description="Context length in tokens.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability during training.")

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        return self


class TrainConfig(Section):
    """The training loop: budget, optimizer, schedule, checkpoints."""

    max_steps: int = Field(300, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(3e-3, gt=0, le=1, description="Peak AdamW learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak.")
    warmup_steps: int = Field(30, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the gradient norm to this (0 = off).")
    eval_interval: int = Field(100, ge=1, description="Steps between validation evaluations.")
    eval_batches: int = Field(8, ge=1, description="Batches of the fixed validation subset per periodic eval.")
    checkpoint_interval: int = Field(100, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' uses CUDA when available.")
    compile: bool = Field(False, description="Wrap the model in torch.compile.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores).")


class EvaluateConfig(Section):
    """Held-out loss, perplexity and bits per byte, and a few samples."""

    batch_size: int = Field(32, ge=1, description="Sequences per evaluation batch.")
    max_tokens_per_split: int | None = Field(None, ge=1, description="Cap on evaluated tokens (default: whole split).")
    samples: int = Field(3, ge=0, description="Text samples generated for the report.")
    sample_tokens: int = Field(80, ge=1, description="Tokens per sample.")
    temperature: float = Field(0.8, gt=0, description="Sampling temperature.")
    top_k: int = Field(40, ge=1, description="Sample from the k most likely tokens.")
    prompts: list[str] = Field(default=["def ", "import ", "class "], description="Prompts for the samples.")


class PipelineConfig(Section):
    """Everything one pipeline run needs."""

    name: str = Field("quickstart", description="Pipeline name, used in run names and lineage.")
    root: str = Field("./data", description="Data root: artifacts, checkpoints and the lineage DuckDB file.")
    seed: int = Field(1337, description="Seed for sampling, initialization and data order.")
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [
            SourceConfig(
                name="stdlib", path=STDLIB, exclude=["test/**", "*/tests/**", "idlelib/**", "site-packages/**"]
            )
        ],
        min_length=1,
        description="Inputs to ingest; at least one, with unique names.",
    )
    clean: CleanConfig = CleanConfig()
    dedup: DedupConfig = DedupConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        return sources

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: object) -> PipelineConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings at the top level")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)
