"""Stack config in, a validated pydantic model out, with errors that name the config key.

Pulumi hands a program its stack config (``Pulumi.<stack>.yaml``) one key at a time; each
stack lists its keys on its model, and this module reads them all and validates them at once,
so a bad value is reported before any resource is declared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import pydantic
from pydantic.alias_generators import to_camel

from stacks.errors import StackConfigError

Model = TypeVar("Model", bound=pydantic.BaseModel)


class StackSettings(pydantic.BaseModel):
    """Base of a stack's settings: camelCase keys as Pulumi config writes them."""

    model_config = pydantic.ConfigDict(
        extra="forbid", populate_by_name=True, alias_generator=to_camel
    )


def _value(raw: str) -> Any:
    # Structured values (objects, lists) reach the program as JSON text; scalars as text.
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def read_settings(model: type[Model], project: str, values: dict[str, str | None]) -> Model:
    """Validate the raw ``{camelKey: text}`` config of ``project`` as ``model``."""
    data = {key: _value(raw) for key, raw in values.items() if raw is not None}
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            problems.append(f"{project}:{where}: {error['msg']}")
        raise StackConfigError(
            "stack config is not valid:\n  "
            + "\n  ".join(problems)
            + "\nSet it with `pulumi config set` (see Pulumi.example.yaml beside the program)."
        ) from None


def config_values(model: type[pydantic.BaseModel], project: str) -> dict[str, str | None]:
    """Every key of ``model`` as Pulumi's config holds it (``None`` where unset)."""
    import pulumi

    config = pulumi.Config(project)
    values: dict[str, str | None] = {}
    for name, field in model.model_fields.items():
        key = field.alias or name
        values[key] = config.get(key)
    return values


def resolve_path(value: str, base_dir: Path) -> Path:
    """A path from stack config: relative ones are relative to the program's directory."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()
