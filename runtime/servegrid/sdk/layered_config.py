"""Build the merged graph config: CLI overrides > YAML > ``@service`` defaults.

(Constructor defaults, the lowest layer, apply when the service is constructed: only the
keys present here are passed to ``__init__``.)
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import yaml

from servegrid.sdk.config import COMMON_CONFIGS, SERVICE_ARGS
from servegrid.sdk.errors import ConfigError
from servegrid.sdk.flags import parse_flags
from servegrid.sdk.graph import Graph
from servegrid.sdk.service import ServiceSpec

GRAPH_KEY = "graph"
COMMON_KEY = "Common"
SERVICE_ARG_KEYS = ("namespace", "resources", "workers", "process", "drain-timeout")


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of service names to settings")
    for key, value in data.items():
        if key != GRAPH_KEY and value is not None and not isinstance(value, dict):
            raise ConfigError(
                f"{path}: {key!r} must be a mapping of settings, not {type(value).__name__}"
            )
    return data


def parse_overrides(args: list[str]) -> dict[str, dict[str, Any]]:
    """``--Service.key=value`` (or ``--Service.key value``) → {Service: {key: value}}.

    Dotted keys nest: ``--Worker.ServiceArgs.workers=2``. Values are read as YAML scalars,
    so ``true``, ``2`` and ``[a, b]`` get their types.
    """
    overrides: dict[str, dict[str, Any]] = {}
    for name, value, arg in parse_flags(args, "--Service.key=value"):
        service, *path = name.split(".")
        if not path:
            raise ConfigError(
                f"unexpected argument {arg!r}: overrides look like --Service.key=value"
            )
        if not service or not all(path):
            raise ConfigError(f"bad override {arg!r}: expected --Service.key=value")
        node = overrides.setdefault(service, {})
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"bad override {arg!r}: {part!r} is not a section")
        node[path[-1]] = value
    return overrides


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge_config(
    graph: Graph | None,
    yaml_config: dict[str, Any],
    overrides: dict[str, dict[str, Any]],
    *,
    known_services: list[str] | None = None,
) -> dict[str, Any]:
    """The merged per-service config. Sections for services outside the graph are kept (one
    config file serves every node), but an override must name a service of the graph.

    ``--Common.key=value`` overrides the YAML's ``Common`` for every service that lists
    ``key`` in its ``common-configs`` (unless that service's own CLI override sets ``key``);
    one that no service lists would change nothing, so it is refused.
    """
    names = graph.names() if graph is not None else list(known_services or [])
    common_override = overrides.get(COMMON_KEY) or {}
    for service in overrides:
        if service == COMMON_KEY:
            continue
        if service not in names and service not in yaml_config:
            raise ConfigError(
                f"override --{service}.…: service {service!r} is not in the graph "
                f"(services: {', '.join(names)})"
            )
    yaml_common = yaml_config.get(COMMON_KEY) or {}
    common = _deep_merge(yaml_common, common_override)
    used_common: set[str] = set()
    merged: dict[str, Any] = {}
    specs = {s.name: s for s in graph.services} if graph is not None else {}
    section_names = [n for n in yaml_config if n not in (GRAPH_KEY, COMMON_KEY)]
    for name in [*names, *[n for n in section_names if n not in names]]:
        section: dict[str, Any] = {}
        spec = specs.get(name)
        if spec is not None and spec.extra:
            section = _deep_merge(section, spec.extra)
        section = _deep_merge(section, yaml_config.get(name) or {})
        section = _deep_merge(section, overrides.get(name, {}))
        wanted = section.get(COMMON_CONFIGS) or []
        if not isinstance(wanted, list):
            raise ConfigError(f"{name}.{COMMON_CONFIGS} must be a list of keys of 'Common'")
        for key in wanted:
            if key not in common:
                raise ConfigError(
                    f"{name}.{COMMON_CONFIGS} lists {key!r}, but 'Common' has no such key "
                    f"(Common keys: {', '.join(common) or 'none'})"
                )
            used_common.add(key)
            # The service's own CLI value wins, then a CLI Common value, then the service's
            # own YAML value, then the YAML Common value.
            own_cli = key in (overrides.get(name) or {})
            if not own_cli and (key in common_override or key not in section):
                section[key] = copy.deepcopy(common[key])
        if SERVICE_ARGS in section and not isinstance(section[SERVICE_ARGS], dict):
            raise ConfigError(f"{name}.{SERVICE_ARGS} must be a mapping")
        if section or spec is not None:
            merged[name] = section
    unused = sorted(set(common_override) - used_common)
    if unused:
        raise ConfigError(
            f"override --{COMMON_KEY}.{unused[0]}: no service lists {unused[0]!r} in its "
            f"{COMMON_CONFIGS}, so it would change nothing; add it to a service's "
            f"{COMMON_CONFIGS}, or override the service directly (--Service.{unused[0]}=...)"
        )
    return merged


def effective_service_args(spec: ServiceSpec, config: dict[str, Any]) -> dict[str, Any]:
    """Decorator arguments overridden by the config's ServiceArgs."""
    args = spec.service_args()
    given = (config.get(spec.name) or {}).get(SERVICE_ARGS) or {}
    args = _deep_merge(args, given)
    workers = args.get("workers")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(
            f"{spec.name}.{SERVICE_ARGS}.workers must be a positive integer, got {workers!r}"
        )
    drain = args.get("drain-timeout")
    if not isinstance(drain, int | float) or isinstance(drain, bool) or drain < 0:
        raise ConfigError(
            f"{spec.name}.{SERVICE_ARGS}.drain-timeout must be seconds (a number >= 0), "
            f"got {drain!r}"
        )
    return args


def constructor_kwargs(spec: ServiceSpec, settings: dict[str, Any]) -> dict[str, Any]:
    """Config keys that name ``__init__`` parameters (``block-size`` → ``block_size``)."""
    params = _init_params(spec.cls)
    kwargs: dict[str, Any] = {}
    for key, value in settings.items():
        param = key.replace("-", "_")
        if param in params:
            kwargs[param] = value
    return kwargs


def missing_required(spec: ServiceSpec, settings: dict[str, Any]) -> list[str]:
    """``__init__`` parameters without a default that the config does not supply."""
    given = {key.replace("-", "_") for key in settings}
    return [
        name
        for name, param in _init_params(spec.cls).items()
        if param.default is inspect.Parameter.empty and name not in given
    ]


def _init_params(cls: type) -> dict[str, inspect.Parameter]:
    if cls.__init__ is object.__init__:
        return {}
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self", None)
    return {
        name: p
        for name, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }


def check_required(graph: Graph, merged: dict[str, Any], only: list[str] | None = None) -> None:
    from servegrid.sdk.config import RESERVED_SERVICE_KEYS

    for spec in graph.services:
        if only is not None and spec.name not in only:
            continue
        section = merged.get(spec.name) or {}
        settings = {k: v for k, v in section.items() if k not in RESERVED_SERVICE_KEYS}
        missing = missing_required(spec, settings)
        if missing:
            key = missing[0]
            raise ConfigError(
                f"service {spec.name!r} requires config key {key!r}: set it under "
                f"'{spec.name}:' in the graph config, or pass --{spec.name}.{key}=VALUE"
            )
        effective_service_args(spec, merged)
