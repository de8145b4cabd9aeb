"""The graph config as both stacks see it, read by the runtime's own loader.

``servegrid serve`` decides which services share a process and how many copies of that
process run (``cli.serve.process_groups``); the stacks take the same answer, so a Deployment
(Kubernetes) or a node's share of workers (AWS) is exactly one of ``serve``'s process groups.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servegrid.cli.loader import LoadedGraph, load_graph
from servegrid.cli.serve import process_groups
from servegrid.sdk.config import SERVICE_ARGS
from servegrid.sdk.errors import UserError
from servegrid.sdk.layered_config import GRAPH_KEY, effective_service_args, load_yaml
from stacks.errors import StackConfigError

WORKERS_KEY = "workers"


@dataclass(frozen=True)
class ProcessGroup:
    """Services that run in one process; ``workers`` copies of it; ``gpus`` per copy.

    ``name`` is the group's name as ``serve`` keys it: ``ServiceArgs.process`` or the service.
    """

    name: str
    services: tuple[str, ...]
    workers: int
    gpus: int


@dataclass(frozen=True)
class GraphPlan:
    """What the stacks need from a graph config file."""

    path: Path
    graph_ref: str
    loaded: LoadedGraph
    groups: tuple[ProcessGroup, ...]
    raw_yaml: dict[str, Any]

    def group_of(self, service: str) -> ProcessGroup | None:
        return next((g for g in self.groups if service in g.services), None)

    def service_args(self, service: str) -> dict[str, Any]:
        spec = self.loaded.graph.get(service)
        assert spec is not None, service
        return effective_service_args(spec, self.loaded.config)

    def settings(self, service: str) -> dict[str, Any]:
        """The service's merged settings (Common folded in), without SDK keys."""
        from servegrid.sdk.config import ServiceConfig

        return ServiceConfig(self.loaded.config).settings(service)

    def placement_free_yaml(self) -> dict[str, Any]:
        """The config file's content without ``ServiceArgs.workers``.

        How many copies run is the Deployment's (or the inventory's) business; leaving it
        out of what every pod reads means scaling one service changes nothing else.
        """
        data = copy.deepcopy(self.raw_yaml)
        for key, section in data.items():
            if key == GRAPH_KEY or not isinstance(section, dict):
                continue
            args = section.get(SERVICE_ARGS)
            if isinstance(args, dict):
                args.pop(WORKERS_KEY, None)
                if not args:
                    section.pop(SERVICE_ARGS)
        return data


def load_graph_plan(path: Path, working_dir: Path | None = None) -> GraphPlan:
    """Load ``path`` as ``servegrid serve -f path`` would, or raise StackConfigError."""
    path = Path(path)
    try:
        loaded = load_graph(None, path, [], (working_dir or Path.cwd()).resolve())
        raw = load_yaml(path)
        groups = []
        for group in process_groups(loaded, None):
            process = str(
                effective_service_args(loaded.graph.get(group.services[0]), loaded.config).get(
                    "process"
                )
                or group.services[0]
            )
            groups.append(ProcessGroup(process, tuple(group.services), group.workers, group.gpus))
    except UserError as exc:
        raise StackConfigError(f"graph config {path}: {exc}") from None
    return GraphPlan(path, loaded.graph_ref, loaded, tuple(groups), raw)


def dns_label(name: str) -> str:
    """``PrefillWorker`` → ``prefill-worker``: a Kubernetes-safe, readable name."""
    kebab = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", name).lower()
    kebab = re.sub(r"[^a-z0-9-]+", "-", kebab).strip("-")
    return kebab[:63] or "service"
