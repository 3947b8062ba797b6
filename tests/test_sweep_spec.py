"""The sweep spec: paths and values checked against the base config before any work, grid expansion, ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tasks.errors import UserError
from tasks.sweep.spec import apply_params, load_spec, sweep_id
from tests.support.corpus import tiny_config


def _write(tmp_path: Path, spec: dict, corpus: Path) -> Path:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tiny_config(corpus, tmp_path / "root").model_dump(mode="json")))
    path = tmp_path / "lr.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml"} | spec, sort_keys=False))
    return path


def test_a_grid_spec_expands_every_combination(tmp_path: Path, corpus: Path):
    path = _write(tmp_path, {"space": {"train.learning_rate": [1e-3, 3e-3], "model.n_layer": [1, 2]}}, corpus)
    spec, base = load_spec(path)
    assert spec.name == "lr" and spec.objective == "val_bpb" and spec.n_trials == 4
    assert spec.grid()[1] == {"train.learning_rate": 1e-3, "model.n_layer": 2}
    cfg = apply_params(base, spec.grid()[3])
    assert (cfg.train.learning_rate, cfg.model.n_layer) == (3e-3, 2)
    assert sweep_id(spec, base) == sweep_id(*load_spec(path))  # same spec, same sweep
    assert sweep_id(spec, base) != sweep_id(*load_spec(path, objective="val_loss"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"space": {"train.learnig_rate": [1e-3]}}, "'train.learnig_rate' is not a setting (train has: "),
        ({"space": {"model.n_head": [3]}}, "model.n_embd (32) must be divisible by model.n_head (3)"),
        ({"space": {"train.learning_rate": [-1.0]}}, "train.learning_rate: Input should be greater than 0"),
        ({"space": {"root": ["/elsewhere"]}}, "'root' cannot be swept"),
        ({"space": {"train.learning_rate": {"low": 1e-3, "high": 1e-2}}}, "a grid needs lists of values"),
        ({"space": {"train.learning_rate": [1e-3]}, "sampler": "tpe"}, "sampler tpe needs trials: N"),
        ({"space": {"train.learning_rate": [1e-3]}, "trials": 2}, "exceeds the grid's 1 combinations"),
        ({"space": {"train.learning_rate": [1e-3]}, "objective": "test_bpb"}, "objective: Input should be"),
    ],
)
def test_a_bad_spec_is_one_line_naming_file_and_field(tmp_path: Path, corpus: Path, spec: dict, message: str):
    path = _write(tmp_path, spec, corpus)
    with pytest.raises(UserError, match=r"lr\.yaml") as err:
        load_spec(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_ranges_are_allowed_for_random_and_tpe(tmp_path: Path, corpus: Path):
    space = {"train.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}, "model.n_layer": {"low": 1, "high": 3}}
    spec, _ = load_spec(_write(tmp_path, {"space": space, "sampler": "random", "trials": 3}, corpus))
    assert spec.space["model.n_layer"].integer and not spec.space["train.learning_rate"].integer
