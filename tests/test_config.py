"""Configuration: YAML files load, bad values fail before any stage runs, with messages that say what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks.config import PipelineConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path):
    cfg = PipelineConfig.from_yaml(path)
    assert cfg.sources


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": {"n_embd": 130, "n_head": 4}}, "divisible"),
        ({"clean": {"min_chars": 10, "max_chars": 5}}, "must be below"),
        ({"tokenizer": {"vocab_size": 10}}, "greater than or equal to 260"),
        ({"train": {"learning_rate": -1}}, "greater than 0"),
        ({"sources": []}, "at least 1"),
        ({"sources": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}, "unique"),
        ({"sources": [{"name": "bad name!", "path": "x"}]}, "pattern"),
        ({"train": {"max_stepz": 3}}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_values_are_rejected_with_a_clear_message(data: dict, message: str):
    with pytest.raises(ValidationError, match=message):
        PipelineConfig.model_validate(data)


def test_yaml_must_be_a_mapping(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        PipelineConfig.from_yaml(path)
