"""Engine names, as a graph config's ``engine:`` key spells them, to engine factories.

Factories are imported on first use, so naming ``mocker`` never imports torch or vllm.
A factory takes the service's merged config (dashed keys) and returns an unstarted Engine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from servegrid.engines.base import Engine, EngineConfigError

EngineFactory = Callable[[Mapping[str, Any]], Engine]

# name -> "module:function"; engines of optional extras add themselves here.
_BUILTIN: dict[str, str] = {
    "mocker": "servegrid.engines.mocker:create",
    "echo": "servegrid.engines.echo:create",
    "torch": "servegrid.engines.torch:create",
    "vllm": "servegrid.engines.vllm:create",
}
_EXTRA_OF: dict[str, str] = {"torch": "torch", "vllm": "vllm"}
_registered: dict[str, EngineFactory] = {}


class UnknownEngineError(EngineConfigError):
    """The config names an engine that does not exist or cannot be loaded here."""


def register_engine(name: str, factory: EngineFactory | str) -> None:
    """Add an engine under ``name``: a factory, or a lazy ``"module:function"`` path."""
    if isinstance(factory, str):
        _BUILTIN[name] = factory
    else:
        _registered[name] = factory


def engine_names() -> list[str]:
    return sorted({*_BUILTIN, *_registered})


def create_engine(name: str, config: Mapping[str, Any] | None = None) -> Engine:
    """A new, unstarted engine called ``name``, configured from ``config``."""
    factory = _registered.get(name)
    if factory is None:
        factory = _load(name)
    return factory(config or {})


def _load(name: str) -> EngineFactory:
    target = _BUILTIN.get(name)
    if target is None:
        raise UnknownEngineError(
            f"unknown engine {name!r}; choose one of: {', '.join(engine_names())}"
        )
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        extra = _EXTRA_OF.get(name)
        hint = f" (install it with `pip install servegrid[{extra}]`)" if extra else ""
        raise UnknownEngineError(
            f"engine {name!r} cannot load: {exc.name} is not installed{hint}"
        ) from exc
    factory = getattr(module, attr)
    _registered[name] = factory
    return factory
