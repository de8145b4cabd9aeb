"""Router: answers "which worker?" for a request; never carries its tokens."""

from __future__ import annotations

import random

from servegrid.components.worker import Worker
from servegrid.errors import NoWorkersError
from servegrid.llm.protocol import RouteRequest, RouteResponse
from servegrid.sdk import depends, endpoint, service
from servegrid.sdk.errors import ConfigError

ROUTER_MODES = ("random", "round-robin")


class WorkerPicker:
    """Random or round-robin choice over a list of instance ids (shared with the Processor)."""

    def __init__(self, mode: str) -> None:
        if mode not in ROUTER_MODES:
            raise ConfigError(
                f"router mode {mode!r} is not one of: {', '.join(ROUTER_MODES)} "
                "(the KV-aware mode 'kv' is not built yet)"
            )
        self.mode = mode
        self._next = 0

    def pick(self, instance_ids: list[int]) -> int:
        if not instance_ids:
            raise NoWorkersError("no worker is registered; start a Worker (or wait for one)")
        if self.mode == "random":
            return random.choice(instance_ids)
        self._next += 1
        return instance_ids[self._next % len(instance_ids)]


@service()
class Router:
    worker = depends(Worker)

    def __init__(self, router_mode: str = "round-robin") -> None:
        self.picker = WorkerPicker(router_mode)
        self._workers = None

    @endpoint()
    async def route(self, request: RouteRequest) -> RouteResponse:
        if self._workers is None:
            self._workers = await self.worker.client("generate")
        return RouteResponse(worker_id=self.picker.pick(self._workers.instance_ids()))
