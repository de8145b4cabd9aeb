"""Graph resolution: from an entry service, follow ``depends`` edges (pruned by ``link``).

``A.link(B)`` records that in this graph A talks to B. A service that appears in any link
keeps only its linked edges; so ``Frontend.link(Processor).link(Worker)`` drops the
Processor's Router edge and every edge of Worker. Services never linked keep all their
``depends`` edges.

The edges belong to the module that states them (the graph module, e.g. ``graphs/agg.py``),
kept in its ``__servegrid_links__``: importing ``graphs.agg_router`` does not change what
``graphs.agg`` resolves to. ``resolve_ref("pkg.graph:Entry")`` uses that module's edges;
``resolve(Entry)`` uses the edges stated in the calling module (or the ``links`` given).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from servegrid.sdk.dependency import Dependency
from servegrid.sdk.errors import GraphError
from servegrid.sdk.service import ServiceSpec, is_service, spec_of


def declared_dependencies(cls: type) -> dict[str, Dependency]:
    """Every ``depends`` attribute of the class and its bases, by attribute name."""
    found: dict[str, Dependency] = {}
    for klass in reversed(cls.__mro__):
        for attr_name, value in vars(klass).items():
            if isinstance(value, Dependency):
                if not value.attr_name:  # assigned after class creation
                    value.attr_name = attr_name
                found[attr_name] = value
    return found


class LinkRegistry:
    def __init__(self) -> None:
        self.edges: dict[type, list[type]] = {}

    def link(self, source: type, target: type) -> None:
        spec_of(source)
        spec_of(target)
        targets = [dep.target for dep in declared_dependencies(source).values()]
        if not any(t is target or issubclass(target, t) for t in targets):
            names = ", ".join(t.__name__ for t in targets) or "nothing"
            raise GraphError(
                f"{source.__name__}.link({target.__name__}): {source.__name__} has no "
                f"depends({target.__name__}) (it depends on: {names})"
            )
        self.edges.setdefault(source, [])
        if target not in self.edges[source]:
            self.edges[source].append(target)
        self.edges.setdefault(target, [])

    def dependencies(self, cls: type) -> list[tuple[str, type]]:
        """(attribute, target class) for each edge of ``cls`` that is active in this graph."""
        declared = declared_dependencies(cls)
        if cls not in self.edges:
            return [(name, dep.target) for name, dep in declared.items()]
        linked = self.edges[cls]
        active: list[tuple[str, type]] = []
        for name, dep in declared.items():
            chosen = next((t for t in linked if t is dep.target or issubclass(t, dep.target)), None)
            if chosen is not None:
                active.append((name, chosen))
        return active

    def clear(self) -> None:
        self.edges.clear()


LINKS_ATTR = "__servegrid_links__"


def links_of_module(module: ModuleType | dict) -> LinkRegistry:
    """The edges stated in ``module`` (a module or its globals), created empty on first use."""
    namespace = module if isinstance(module, dict) else vars(module)
    registry = namespace.get(LINKS_ATTR)
    if not isinstance(registry, LinkRegistry):
        registry = LinkRegistry()
        namespace[LINKS_ATTR] = registry
    return registry


def links_of_caller(depth: int = 1) -> LinkRegistry:
    """The edges of the module whose code is ``depth`` frames above this call."""
    return links_of_module(sys._getframe(depth + 1).f_globals)


@dataclass
class Graph:
    entry: ServiceSpec
    services: list[ServiceSpec]  # dependencies before dependents
    edges: dict[str, list[str]] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [s.name for s in self.services]

    def get(self, name: str) -> ServiceSpec | None:
        return next((s for s in self.services if s.name == name), None)


def resolve(entry: type, links: LinkRegistry | None = None) -> Graph:
    """The graph from ``entry``, pruned by ``links`` (default: the calling module's)."""
    if links is None:
        links = links_of_caller(1)
    if not is_service(entry):
        raise GraphError(f"{entry!r} is not a @service class")
    order: list[ServiceSpec] = []
    edges: dict[str, list[str]] = {}
    state: dict[type, str] = {}  # "visiting" | "done"
    path: list[type] = []

    def visit(cls: type) -> None:
        if state.get(cls) == "done":
            return
        if state.get(cls) == "visiting":
            cycle = [*path[path.index(cls) :], cls]
            raise GraphError("cycle in depends: " + " -> ".join(c.__name__ for c in cycle))
        state[cls] = "visiting"
        path.append(cls)
        spec = spec_of(cls)
        edges[spec.name] = []
        for _attr, target in links.dependencies(cls):
            edges[spec.name].append(spec_of(target).name)
            visit(target)
        path.pop()
        state[cls] = "done"
        order.append(spec)

    visit(entry)
    names = [s.name for s in order]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise GraphError(f"two services in the graph share the name(s): {', '.join(duplicates)}")
    return Graph(entry=spec_of(entry), services=order, edges=edges)


def resolve_ref(ref: str, working_dir: Path | None = None) -> Graph:
    """Import ``module:Class`` and resolve its graph with the edges that module states."""
    entry = import_service(ref, working_dir)
    module_name = ref.partition(":")[0] if ":" in ref else ref.rpartition(".")[0]
    return resolve(entry, links_of_module(sys.modules[module_name]))


def import_service(ref: str, working_dir: Path | None = None) -> type:
    """Import ``module:Class`` (or ``module.Class``) and return the service class."""
    if working_dir is not None and str(working_dir) not in sys.path:
        sys.path.insert(0, str(working_dir))
    if ":" in ref:
        module_name, _, attr = ref.partition(":")
    elif "." in ref:
        module_name, _, attr = ref.rpartition(".")
    else:
        raise GraphError(
            f"graph {ref!r} must be 'module:Class', e.g. servegrid.graphs.agg:Frontend"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise GraphError(
            f"cannot import graph {ref!r}: no module named {exc.name!r} "
            f"(run from the directory that holds it, or pass --working-dir)"
        ) from exc
    except GraphError:
        raise
    except Exception as exc:
        raise GraphError(f"cannot import graph {ref!r}: {type(exc).__name__}: {exc}") from exc
    try:
        cls = getattr(module, attr)
    except AttributeError:
        raise GraphError(
            f"cannot import graph {ref!r}: module {module_name!r} has no {attr!r}"
        ) from None
    if not is_service(cls):
        raise GraphError(f"graph {ref!r} is not a @service class")
    return cls
