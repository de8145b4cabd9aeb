"""From command-line arguments to a resolved graph and its merged config (no side effects)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servegrid.sdk.errors import ConfigError, GraphError
from servegrid.sdk.graph import Graph, resolve_ref
from servegrid.sdk.layered_config import (
    GRAPH_KEY,
    check_required,
    load_yaml,
    merge_config,
    parse_overrides,
)


@dataclass
class LoadedGraph:
    graph_ref: str
    graph: Graph
    config: dict[str, Any]
    config_file: Path | None
    yaml_config: dict[str, Any]


def load_graph(
    target: str | None,
    config_file: Path | None,
    extra_args: list[str],
    working_dir: Path,
    service_names: list[str] | None = None,
) -> LoadedGraph:
    yaml_config = load_yaml(config_file) if config_file is not None else {}
    graph_ref = target or yaml_config.get(GRAPH_KEY)
    if not graph_ref:
        where = f"{config_file} has no '{GRAPH_KEY}:' key" if config_file else "no -f CONFIG given"
        raise GraphError(
            f"which graph? {where}; pass module:Class (e.g. servegrid.graphs.agg:Frontend) "
            f"or add '{GRAPH_KEY}: module:Class' to the config"
        )
    if not isinstance(graph_ref, str):
        raise ConfigError(f"{config_file}: '{GRAPH_KEY}' must be a string like module:Class")
    graph = resolve_ref(graph_ref, working_dir)
    for name in service_names or []:
        if graph.get(name) is None:
            raise GraphError(
                f"--service-name {name}: no such service in {graph_ref} "
                f"(services: {', '.join(graph.names())})"
            )
    merged = merge_config(graph, yaml_config, parse_overrides(extra_args))
    check_required(graph, merged, only=service_names)
    return LoadedGraph(graph_ref, graph, merged, config_file, yaml_config)
