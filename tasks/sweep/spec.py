"""The sweep spec: a base pipeline config, a space of dotted config paths, a sampler, an objective.

```yaml
name: lr-and-depth          # default: the spec file's name
base: quickstart.yaml       # pipeline config, relative to this file
space:                      # dotted config path -> list of values (grid, or choices for random / tpe)
  train.learning_rate: [1.0e-3, 3.0e-3]
  model.n_layer: [2, 4]
  dedup.threshold: {low: 0.6, high: 0.9}   # a range (random / tpe only); ints stay ints, log: true for log scale
sampler: grid               # grid | random | tpe
trials: 4                   # random / tpe: how many; grid: at most all combinations (default)
objective: val_bpb          # or val_loss
```

Every path and value is checked against the base config before any work: a misspelt path or a value the
config rejects is a one-line ``UserError`` naming the spec file, the path and what to do.
"""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from storage.hashing import canonical_json, fingerprint
from tasks.config import PipelineConfig
from tasks.errors import UserError

Scalar = bool | int | float | str
FIXED_PATHS = ("name", "root")  # where a trial lives, not what it computes


class Range(BaseModel):
    """A numeric range for random / tpe sampling (``int`` when both ends are ints)."""

    model_config = ConfigDict(extra="forbid")

    low: float | int
    high: float | int
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"range low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)


class Pruning(BaseModel):
    """Successive halving on the trials' periodic validation loss (Optuna's ``SuccessiveHalvingPruner``)."""

    model_config = ConfigDict(extra="forbid")

    min_steps: int = Field(1, ge=1, description="Steps before a trial can be pruned (the first rung).")
    reduction_factor: int = Field(2, ge=2, description="Keep the best 1/reduction_factor at each rung.")


class SweepSpec(BaseModel):
    """What to search, how, and by which validation number."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("sweep", pattern=r"^[A-Za-z0-9_.-]+$", description="Sweep name (lineage, reports).")
    base: str = Field(..., description="Pipeline config YAML the trials start from (relative to the spec file).")
    root: str | None = Field(None, description="Data root (default: the base config's).")
    space: dict[str, list[Scalar] | Range] = Field(..., min_length=1, description="Dotted config path → values.")
    sampler: Literal["grid", "random", "tpe"] = Field("grid", description="grid, random or tpe (Optuna).")
    trials: int | None = Field(None, ge=1, description="Trials to run (grid: default all combinations).")
    objective: Literal["val_bpb", "val_loss"] = Field("val_bpb", description="Minimised on the fixed eval set.")
    seed: int = Field(0, description="Seed of the sampler.")
    concurrency: int = Field(2, ge=1, le=64, description="Trials in flight; CPU training slots (limit cpu-train).")
    pruning: Pruning | None = Field(None, description="Stop weak trials early (successive halving).")
    eval_max_docs: int | None = Field(None, ge=1, description="Cap on the fixed evaluation documents.")

    @model_validator(mode="after")
    def _sampler_fits_space(self) -> SweepSpec:
        ranges = [path for path, values in self.space.items() if isinstance(values, Range)]
        if self.sampler == "grid" and ranges:
            raise ValueError(f"space: {ranges} are ranges; a grid needs lists of values (or use sampler: random|tpe)")
        if self.sampler != "grid" and self.trials is None:
            raise ValueError(f"sampler {self.sampler} needs trials: N")
        if self.sampler == "grid" and self.trials is not None and self.trials > self.grid_size():
            raise ValueError(f"trials ({self.trials}) exceeds the grid's {self.grid_size()} combinations")
        empty = [path for path, values in self.space.items() if isinstance(values, list) and not values]
        if empty:
            raise ValueError(f"space: {empty} have no values")
        return self

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.space.values() if isinstance(v, list))

    def grid(self) -> list[dict[str, Scalar]]:
        """Every combination of a grid space, in a stable order."""
        paths = list(self.space)
        return [dict(zip(paths, combo, strict=True)) for combo in itertools.product(*self.space.values())]

    @property
    def n_trials(self) -> int:
        return self.trials if self.trials is not None else self.grid_size()


def _set_path(data: dict[str, Any], path: str, value: Any, where: str) -> None:
    """Set ``data[a][b]… = value`` for ``path`` ``a.b…``; every key must exist in the base config."""
    keys = path.split(".")
    node = data
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            known = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a section)"
            parent = ".".join(keys[:depth]) or "the config"
            raise UserError(f"{where}: space: {path!r} is not a setting ({parent} has: {known}); fix the path")
        if depth == len(keys) - 1:
            node[key] = value
        else:
            node = node[key]


def apply_params(base: PipelineConfig, params: dict[str, Any], where: str = "sweep spec") -> PipelineConfig:
    """The base config with each dotted path set to its value, validated like any pipeline config."""
    data = copy.deepcopy(base.model_dump())
    for path, value in params.items():
        if path.split(".")[0] in FIXED_PATHS:
            raise UserError(f"{where}: space: {path!r} cannot be swept (trials share the base config's {path})")
        _set_path(data, path, value, where)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "config"
        raise UserError(f"{where}: space {params}: {field}: {first['msg']}; change the values") from None


def check_space(spec: SweepSpec, base: PipelineConfig, where: str) -> None:
    """Refuse a space the base config cannot take, before any work: every grid point, or every value alone."""
    if spec.pruning is not None and base.train.nproc * base.train.nnodes > 1:
        raise UserError(f"{where}: pruning stops in-process training only; drop pruning or set train.nproc: 1")
    if spec.sampler == "grid":
        for params in spec.grid():
            apply_params(base, params, where)
        return
    for path, values in spec.space.items():
        for value in [values.low, values.high] if isinstance(values, Range) else values:
            apply_params(base, {path: value}, where)


def load_spec(path: str | Path, **overrides: Any) -> tuple[SweepSpec, PipelineConfig]:
    """Read a spec YAML (fields in ``overrides`` that are not None replace the file's) and its base config."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such sweep spec; pass --spec with a YAML file (see docs/sweeps.md)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err}); fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping (base, space, sampler, trials, objective)")
    data.setdefault("name", path.stem)
    return resolve_spec(data | {k: v for k, v in overrides.items() if v is not None}, path.parent, str(path))


def resolve_spec(data: dict[str, Any], base_dir: Path, where: str) -> tuple[SweepSpec, PipelineConfig]:
    """Validate a spec given as data; its ``base`` is read relative to ``base_dir``."""
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "spec"
        raise UserError(f"{where}: {field}: {first['msg']}") from None
    base_path = Path(spec.base) if Path(spec.base).is_absolute() else base_dir / spec.base
    if not base_path.is_file():
        raise UserError(f"{where}: base: {spec.base!r} is not a file (paths are relative to the spec)")
    try:
        base = PipelineConfig.from_yaml(base_path, root=spec.root)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{where}: base config {base_path}: {field}: {first['msg']}; fix the base config") from None
    except ValueError as err:
        raise UserError(f"{where}: base config {base_path}: {err}") from None
    check_space(spec, base, where)
    return spec, base


def sweep_id(spec: SweepSpec, base: PipelineConfig) -> str:
    """``<name>-<hash>``: the same spec on the same base config is the same sweep (reruns continue it)."""
    searched = spec.model_dump(mode="json", exclude={"base", "root", "concurrency"})
    digest = fingerprint("sweep", "1", {"spec": searched, "base": base.model_dump(mode="json")}, [])
    return f"{spec.name}-{digest[:10]}"


def params_key(params: dict[str, Any]) -> str:
    return canonical_json(params)
