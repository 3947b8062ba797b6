"""Configuration: YAML files load, bad values fail before any stage runs, with messages that say what to fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from storage.redaction import REDACTED
from tasks.config import PipelineConfig, validated
from tasks.errors import UserError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


PIPELINE_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("sweep-"))  # sweeps: own spec


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=lambda p: p.name)
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


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"seed": 2**70}, "seed", "less than or equal to 9223372036854775807"),
        ({"dedup": {"minhash_seed": 2**64}}, "dedup.minhash_seed", "less than or equal"),
        ({"tokenizer": {"special_tokens": []}}, "tokenizer.special_tokens", "end-of-text token"),
        ({"tokenizer": {"special_tokens": ["<a>", "<a>"]}}, "tokenizer.special_tokens", "distinct"),
        ({"sources": [{"name": "a", "path": ""}]}, "sources.0.path", "current directory"),
        ({"sources": [{"name": "a", "path": "  "}]}, "sources.0.path", "current directory"),
        ({"sources": [{"name": "a", "path": "x", "include_ext": []}]}, "sources.0.include_ext", "no file would be"),
        ({"sources": [{"name": "a", "path": "x", "include_ext": [""]}]}, "sources.0.include_ext", "every file"),
        (
            {"sources": [{"name": "a", "path": "x", "split": "regex", "split_pattern": r"\n*"}]},
            "sources.0",
            "can match the empty string",
        ),
        (
            {"sources": [{"name": "a", "path": "x", "split": "regex", "split_pattern": r"(?=#)"}]},
            "sources.0",
            "can match the empty string",
        ),
        ({"root": "corpus/data", "sources": [{"name": "a", "path": "corpus"}]}, "", "contains the data root"),
        ({"root": "corpus", "sources": [{"name": "a", "path": "corpus"}]}, "", "contains the data root"),
    ],
)
def test_bad_values_name_the_field_and_the_reason(data: dict, field: str, reason: str):
    with pytest.raises(UserError) as caught:
        validated(data, "test.yaml")
    message = str(caught.value)
    assert message.startswith("test.yaml: invalid configuration: ") and "\n" not in message
    assert f"{field}: " in message if field else "sources[0]" in message
    assert reason in message


def test_a_source_may_hold_the_root_when_it_excludes_it():
    cfg = validated({"root": "corpus/data", "sources": [{"name": "a", "path": "corpus", "exclude": ["data/**"]}]})
    assert cfg.sources[0].path == "corpus"


def test_extensions_are_matched_case_insensitively():
    cfg = validated({"sources": [{"name": "a", "path": "x", "include_ext": [".TXT", ".Rst.Txt"]}]})
    assert cfg.sources[0].include_ext == [".txt", ".rst.txt"]


def test_a_split_pattern_that_needs_characters_is_accepted():
    validated({"sources": [{"name": "a", "path": "x", "split": "regex", "split_pattern": r"\n#{2,}\s*"}]})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"- just\n- a list\n", "expected a mapping of settings at the top level (name:, sources:, ...), got a list"),
        (b"42\n", "got a number"),
        (b"just words\n", "got a string"),
        (b"name: [unclosed\n", "invalid YAML at line 2, column 1"),
        (b"name: caf\xe9\n", "is not UTF-8 text (byte 9); save it as UTF-8"),
        (b"seed: -1\n", "invalid configuration: seed: Input should be greater than or equal to 0"),
    ],
)
def test_a_bad_yaml_file_is_one_line_naming_the_file(tmp_path: Path, content: bytes, message: str):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        PipelineConfig.from_yaml(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_missing_yaml_file_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match="cannot read the configuration"):
        PipelineConfig.from_yaml(tmp_path / "nope.yaml")


SECRETS = {"key": "AKIAEXAMPLEKEY123", "secret": "hunter2-secret", "client_kwargs": {"session_token": "tok-999"}}


def _secret_source(**extra: object) -> dict:
    return {"name": "s3", "path": "s3://alice:pa55word@bucket/x", "storage_options": SECRETS | {"anon": False}} | extra


def _assert_no_secret(text: str) -> None:
    for secret in ("AKIAEXAMPLEKEY123", "hunter2-secret", "tok-999", "pa55word"):
        assert secret not in text


def test_credentials_are_redacted_in_every_dump_and_repr_but_kept_for_the_filesystem():
    cfg = validated({"sources": [_secret_source()]})
    source = cfg.sources[0]
    assert source.storage_options["secret"] == "hunter2-secret"  # what fsspec gets
    assert source.storage_options["client_kwargs"]["session_token"] == "tok-999"
    for text in (cfg.model_dump_json(), json.dumps(cfg.model_dump(mode="json")), repr(cfg), str(source)):
        _assert_no_secret(text)
    dumped = cfg.model_dump()["sources"][0]
    assert dumped["storage_options"] == {
        "key": REDACTED,
        "secret": REDACTED,
        "client_kwargs": {"session_token": REDACTED},
        "anon": False,
    }
    assert dumped["path"] == "s3://<redacted>@bucket/x"


def test_a_recorded_configuration_drops_the_placeholders_so_the_environment_supplies_credentials():
    recorded = validated({"sources": [_secret_source()]}).model_dump(mode="json")
    again = validated(recorded)
    assert again.sources[0].storage_options == {"client_kwargs": {}, "anon": False}


def test_validation_errors_do_not_echo_credentials():
    with pytest.raises(UserError) as caught:
        validated({"sources": [_secret_source(bogus=1)], "seed": "x"})
    _assert_no_secret(str(caught.value))
    assert "sources.0.bogus: Extra inputs are not permitted" in str(caught.value)
