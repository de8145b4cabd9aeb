"""The one ``--key=value`` parser: ``servegrid serve`` overrides and component launch flags.

``--key=value``, ``--key value`` and a bare ``--flag`` (true) all work; values are read as
YAML scalars, so ``true``, ``2`` and ``[a, b]`` get their types.
"""

from __future__ import annotations

from typing import Any

import yaml

from servegrid.sdk.errors import ConfigError


def parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def parse_flags(argv: list[str], shape: str = "--key=value") -> list[tuple[str, Any, str]]:
    """``(key, value, the argument as written)`` for each flag; ``shape`` goes in errors."""
    flags: list[tuple[str, Any, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: flags look like {shape}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
                value = argv[i]
            else:
                value = "true"  # a bare --flag means true
        flags.append((key, parse_value(value), arg))
        i += 1
    return flags
