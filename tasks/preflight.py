"""Checks run before any stage: every path the configuration names exists and means what it should.

``preflight`` is called by ``run_all``, the ``pipeline`` flow and the CLI, so a missing source folder, a source
that matches no file, a missing ``tokenizer.pretrained`` or ``dedup.against`` is one line (``UserError``) before
any work, not a failure inside a stage minutes later.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from tasks.config import PipelineConfig, SourceConfig
from tasks.data import readers
from tasks.data.decontaminate import set_fingerprint
from tasks.data.dedup import resolve_previous
from tasks.errors import UserError

SUFFIX_SAMPLE_FILES = 10_000  # files looked at to name the endings a source does hold


def preflight(cfg: PipelineConfig) -> None:
    """Raise ``UserError`` for the first path in ``cfg`` that cannot work; return quietly otherwise."""
    for i, source in enumerate(cfg.sources):
        check_source(i, source)
    check_pretrained_tokenizer(cfg)
    check_evaluation_sets(cfg)
    if cfg.dedup.against not in (None, "latest"):
        try:
            resolve_previous(cfg.dedup.against, cfg.root)
        except (FileNotFoundError, ValueError) as err:
            raise UserError(f"{err}; point dedup.against at a dedup artifact folder, or use 'latest'") from None


def check_source(i: int, source: SourceConfig) -> None:
    """The source exists and at least one of its files has one of the ``include_ext`` endings."""
    where = f"sources[{i}] ({source.name!r})"
    fs, root = readers.source_filesystem(source)
    if not fs.exists(root):
        raise UserError(f"{where}: {source.model_dump()['path']} does not exist; fix sources[{i}].path")
    if readers.has_files(source):
        return
    found = found_suffixes(source)
    listing = ", ".join(f"{ext} ({n})" for ext, n in found.most_common(8)) or "no files at all"
    raise UserError(
        f"{where}: no file under {source.model_dump()['path']} ends with one of {source.include_ext} "
        f"(include_ext matches the end of the file name); found {listing}"
        + (f" — add {found.most_common(1)[0][0]!r} to sources[{i}].include_ext" if found else "")
    )


def found_suffixes(source: SourceConfig) -> Counter[str]:
    """File-name endings (``.rst.txt``, ``.txt``) of up to ``SUFFIX_SAMPLE_FILES`` files of a source folder."""
    fs, root = readers.source_filesystem(source)
    if isinstance(fs, LocalFileSystem):  # a lazy walk: stops after the sample, however large the folder
        names: Iterator[str] = (name for _, _, files in os.walk(root) for name in files)
    else:
        names = (path.rsplit("/", 1)[-1] for path in fs.find(root, withdirs=False))
    counts: Counter[str] = Counter()
    for name in itertools.islice(names, SUFFIX_SAMPLE_FILES):
        suffixes = Path(name).suffixes
        if suffixes:
            counts["".join(suffixes[-2:]).lower()] += 1
    return counts


def check_evaluation_sets(cfg: PipelineConfig) -> None:
    """Every ``decontaminate.sets`` entry names JSONL or Parquet files (their content is hashed here too)."""
    if cfg.decontaminate.enabled:
        for eval_set in cfg.decontaminate.sets:
            set_fingerprint(eval_set)


def check_pretrained_tokenizer(cfg: PipelineConfig) -> None:
    """``tokenizer.pretrained`` is a tokenizer.json that loads and holds every special token."""
    if not cfg.tokenizer.pretrained:
        return
    path = Path(cfg.tokenizer.pretrained).expanduser()
    if not path.is_file():
        raise UserError(f"tokenizer.pretrained: {path} is not a file; give the path of a tokenizer.json")
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception for any unparsable file
        raise UserError(f"tokenizer.pretrained: {path} is not a tokenizers JSON file ({err})") from None
    missing = [t for t in cfg.tokenizer.special_tokens if tokenizer.token_to_id(t) is None]
    if missing:
        raise UserError(
            f"tokenizer.pretrained: {path} lacks the special tokens {missing}; set tokenizer.special_tokens to "
            "tokens it has"
        )
