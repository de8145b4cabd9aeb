"""How a pod starts its process group: the launch-style modules where they fit, else serve.

``python -m servegrid.frontend --http-port 8000 --router-mode kv`` and ``python -m
servegrid.worker --engine ... --model ...`` (the seed's Kubernetes launch commands) take the
group's settings as flags. They start their services without the graph, so they are used
only where the graph wires those services the way the module does; any other group (a
Router, a PrefillWorker, a frontend whose Processor asks a Router) runs ``servegrid serve
-f /etc/servegrid/graph.yaml --service-name ...`` from the config in the ConfigMap, one copy
per pod.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from servegrid.components.launch import ALIASES
from servegrid.sdk.config import SERVICE_ARGS
from servegrid.sdk.flags import parse_value
from stacks.graph import GraphPlan, ProcessGroup

CONFIG_DIR = "/etc/servegrid"
CONFIG_FILE = "graph.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"  # where nodes keep it too (deploy roles)
PYTHON = "python"
FLAG_NAMES = {key: flag for flag, key in ALIASES.items()}  # port → http-port, ...


@dataclass(frozen=True)
class LaunchModule:
    module: str
    services: frozenset[str]
    # the graph edges the module reproduces (what each service talks to)
    edges: dict[str, list[str]]


LAUNCH_MODULES = (
    LaunchModule(
        "servegrid.frontend",
        frozenset({"Frontend", "Processor"}),
        {"Frontend": ["Processor"], "Processor": ["Worker"]},
    ),
    LaunchModule("servegrid.worker", frozenset({"Worker"}), {"Worker": []}),
)


@dataclass(frozen=True)
class Launch:
    args: list[str]
    reads_config_file: bool


def flag_value(value: Any) -> str:
    """``value`` as text that the launch parser reads back as the same value."""
    if isinstance(value, list | dict):
        return json.dumps(value)
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return text if parse_value(text) == value else json.dumps(value)


def launch_command(graph: GraphPlan, group: ProcessGroup) -> Launch:
    module = _launch_module(graph, group)
    if module is not None:
        settings = _group_settings(graph, group)
        if settings is not None:
            args = [PYTHON, "-m", module.module]
            for key, value in settings.items():
                flag = f"--{FLAG_NAMES.get(key, key)}"
                text = flag_value(value)
                args += [f"{flag}={text}"] if text.startswith("-") else [flag, text]
            return Launch(args, reads_config_file=False)
    services = list(group.services)
    one_copy = [f"--{name}.{SERVICE_ARGS}.workers=1" for name in services]
    args = [PYTHON, "-m", "servegrid.cli", "serve", "-f", CONFIG_PATH]
    return Launch([*args, "--service-name", ",".join(services), *one_copy], True)


def _launch_module(graph: GraphPlan, group: ProcessGroup) -> LaunchModule | None:
    edges = graph.loaded.graph.edges
    for candidate in LAUNCH_MODULES:
        if candidate.services != frozenset(group.services):
            continue
        if all(sorted(edges.get(s, [])) == sorted(e) for s, e in candidate.edges.items()):
            return candidate
    return None


def _group_settings(graph: GraphPlan, group: ProcessGroup) -> dict[str, Any] | None:
    """The group's settings as one flag set; None when two services disagree on a key."""
    merged: dict[str, Any] = {}
    for service in group.services:
        for key, value in graph.settings(service).items():
            if key in merged and merged[key] != value:
                return None
            merged[key] = value
    return merged
