"""The few run parameters people change, as the Prefect UI shows them: titled, described, bounded.

Prefect builds a deployment's parameter form from the flow signature; it keeps constraints and
``json_schema_extra`` of an ``Annotated`` field but titles every field by its Python name and drops its
description, so ``form_field`` puts title and description into ``json_schema_extra``.

Values arriving from a UI-created or UI-edited schedule are not hydrated by the server's scheduler: an
untouched field may arrive as a ``{"__prefect_kind": "json"}`` placeholder. ``UiValue`` hydrates such values
as the server does for manual runs, and an absent value means "the deployment's default" (``resolve_run_config``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field
from pydantic.fields import FieldInfo

from tasks.config import PipelineConfig
from tasks.errors import UserError

CONFIG_DIRS = (Path("configs"), Path(__file__).resolve().parents[1] / "configs")
DEFAULT_CONFIG = "quickstart"


def form_field(title: str, description: str, **constraints: Any) -> FieldInfo:
    """A parameter's title and description as the Prefect UI shows them (bounds of an optional value belong on
    its inner type: ``Annotated[int, Field(ge=1)] | None``)."""
    return Field(**constraints, json_schema_extra={"title": title, "description": description})


def hydrate_ui_value(value: Any) -> Any:
    """Resolve Prefect UI placeholders (``{"__prefect_kind": ...}``) the way the server does for manual runs;
    a placeholder without a value becomes None (unset)."""
    if not _has_placeholder(value):
        return value
    from prefect.utilities.schema_tools.hydration import hydrate

    return hydrate({"value": value}).get("value")


def _has_placeholder(value: Any) -> bool:
    if isinstance(value, dict):
        return "__prefect_kind" in value or any(_has_placeholder(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_placeholder(v) for v in value)
    return False


UiValue = BeforeValidator(hydrate_ui_value)

ConfigParam = Annotated[
    str | PipelineConfig | None,
    UiValue,
    form_field(
        "Configuration",
        "A configuration name from configs/ (e.g. quickstart) or the path of a pipeline YAML. Pick the object "
        "form to edit every setting of the full configuration instead. Empty: the deployment's default.",
    ),
]
RootParam = Annotated[
    str | None,
    UiValue,
    form_field("Data root", "Where artifacts and lineage.duckdb live (folder or s3://…). Empty: the configuration's."),
]
SeedParam = Annotated[
    Annotated[int, Field(ge=0)] | None,
    UiValue,
    form_field("Seed", "Seed for sampling, initialization and data order. Empty: the configuration's."),
]
TrainStepsParam = Annotated[
    Annotated[int, Field(ge=1, le=1_000_000)] | None,
    UiValue,
    form_field(
        "Training steps",
        "Training budget in optimizer steps (1 to 1,000,000). Empty: the configuration's train.max_steps.",
    ),
]
SourcesParam = Annotated[
    list[Annotated[str, Field(min_length=1)]] | None,
    UiValue,
    form_field(
        "Sources",
        "Folders, files or URIs to ingest instead of the configuration's sources; write name=path to name one "
        "(default name: the last path component). Empty: the configuration's sources.",
    ),
]


def config_path(ref: str) -> Path:
    """The YAML a configuration name or path refers to, or a one-line error listing the known names."""
    path = Path(ref).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise UserError(f"configuration file {ref} does not exist: give a pipeline YAML or a name from configs/")
        return path
    for folder in CONFIG_DIRS:
        if (folder / f"{ref}.yaml").is_file():
            return folder / f"{ref}.yaml"
    known = sorted({p.stem for folder in CONFIG_DIRS if folder.is_dir() for p in folder.glob("*.yaml")})
    raise UserError(f"no configuration named {ref!r}: use one of {', '.join(known) or '(none)'} or a YAML path")


def source_entries(sources: list[str]) -> list[dict[str, str]]:
    """``path`` or ``name=path`` entries as source settings (name: the path's last component)."""
    entries = []
    for item in sources:
        name, sep, path = item.partition("=")
        if not sep or "/" in name or ":" in name:
            name, path = Path(item.rstrip("/")).name.split(".")[0] or "source", item
        entries.append({"name": name, "path": path})
    return entries


def resolve_run_config(
    config: str | PipelineConfig | dict | None,
    *,
    root: str | None = None,
    seed: int | None = None,
    train_steps: int | None = None,
    sources: list[str] | None = None,
) -> PipelineConfig:
    """The run's configuration: a name, path or full configuration, with the short form's overrides applied."""
    if config is None or isinstance(config, str):
        data = PipelineConfig.from_yaml(config_path(config or DEFAULT_CONFIG)).model_dump()
    else:
        data = (config if isinstance(config, PipelineConfig) else PipelineConfig.model_validate(config)).model_dump()
    if root:
        data["root"] = root
    if seed is not None:
        data["seed"] = seed
    if train_steps is not None:
        data["train"] = data["train"] | {"max_steps": train_steps, "max_tokens": None}
    if sources:
        data["sources"] = source_entries(sources)
    return PipelineConfig.model_validate(data)
