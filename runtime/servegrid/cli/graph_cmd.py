"""``servegrid graph``: the resolved graph as a tree."""

from __future__ import annotations

from rich.console import Console
from rich.tree import Tree

from servegrid.cli.loader import LoadedGraph
from servegrid.sdk.layered_config import effective_service_args


def print_graph(loaded: LoadedGraph) -> None:
    graph = loaded.graph
    specs = {s.name: s for s in graph.services}

    def label(name: str) -> str:
        spec = specs[name]
        args = effective_service_args(spec, loaded.config)
        resources = ", ".join(f"{k}={v}" for k, v in (args.get("resources") or {}).items())
        endpoints = ", ".join(spec.endpoints) or "-"
        text = f"[bold]{name}[/bold]  ns={args['namespace']}  workers={args['workers']}"
        if resources:
            text += f"  resources: {resources}"
        return text + f"  endpoints: {endpoints}"

    def add(node: Tree, name: str, seen: set[str]) -> None:
        for child in graph.edges.get(name, []):
            branch = node.add(label(child) if child not in seen else f"{child} (see above)")
            if child not in seen:
                seen.add(child)
                add(branch, child, seen)

    root = Tree(label(graph.entry.name))
    add(root, graph.entry.name, {graph.entry.name})
    console = Console()
    console.print(f"graph {loaded.graph_ref}: {len(graph.services)} services")
    console.print(root)
