"""Reading an engine's settings out of a service config's dashed keys.

A Worker hands its engine every key of its merged config (``block-size``, ``max-model-len``,
``speedup-ratio``...); each engine declares the keys it knows as a frozen dataclass and reads
them here, so "which type is this key, what does a bad value say" lives in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

from servegrid.engines.base import EngineConfigError

T = TypeVar("T")


def read_settings(cls: type[T], config: Mapping[str, Any], engine: str) -> T:
    """An instance of dataclass ``cls`` from ``config``; keys of other parts are ignored.

    A field ``max_model_len`` is read from ``max-model-len`` (or ``max_model_len``); a missing
    or null key keeps the field's default. Raises ``EngineConfigError`` naming the key.
    """
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        key = f.name.replace("_", "-")
        raw = config.get(key, config.get(f.name))
        if raw is None:
            continue
        values[f.name] = coerce(engine, key, raw, f.type)
    return cls(**values)


def coerce(engine: str, key: str, raw: Any, type_name: Any) -> Any:
    """``raw`` as the dataclass field type ``type_name`` (a string under postponed annotations)."""
    kind = str(type_name)
    try:
        if kind.startswith("bool"):
            if isinstance(raw, str):
                if raw.lower() in ("true", "1", "yes", "on"):
                    return True
                if raw.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(raw)
            return bool(raw)
        if kind.startswith("int"):
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        if kind.startswith("dict"):
            if not isinstance(raw, Mapping):
                raise ValueError(raw)
            return dict(raw)
        return str(raw)
    except (TypeError, ValueError):
        expected = kind.split(" ")[0]
        raise EngineConfigError(f"{engine}: {key} must be {expected}, got {raw!r}") from None
