"""The per-process context the hosting runner fills in: the runtime and co-located services.

``servegrid_context["runtime"]`` is the process's DistributedRuntime, for services that want
the low-level API (``runtime.namespace(ns).component(name).endpoint(ep).client()``).
"""

from __future__ import annotations

from typing import Any


class ServiceContext(dict):
    """A dict (seed-compatible) with typed accessors for what the runner puts in it."""

    @property
    def runtime(self) -> Any:
        runtime = self.get("runtime")
        if runtime is None:
            raise RuntimeError(
                "no servegrid runtime in this process: services run under `servegrid serve`"
            )
        return runtime

    def linked(self, source: type, target: type) -> bool:
        """Whether the graph this process serves has the edge ``source`` → ``target``.

        False outside a graph (a service started from flags has no graph edges).
        """
        from servegrid.sdk.service import spec_of

        graph = self.get("graph")
        if graph is None:
            return False
        return spec_of(target).name in graph.edges.get(spec_of(source).name, [])

    @property
    def local_services(self) -> dict[str, Any]:
        """Instances of services hosted in this very process, by service name."""
        return self.setdefault("local_services", {})

    def instance_id(self, service: str) -> int:
        """The instance id this process registers ``service``'s endpoints under (known before
        its ``async_on_start`` hooks run, so a service can announce itself by it)."""
        ids = self.get("instance_ids") or {}
        if service not in ids:
            raise RuntimeError(f"service {service!r} is not hosted in this process")
        return ids[service]


servegrid_context = ServiceContext()
