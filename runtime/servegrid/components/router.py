"""Router: answers "which worker?" for a request; never carries its tokens.

Modes (``Router.router-mode``, or ``Processor.router`` when the graph has no Router):
``random``, ``round-robin``, and ``kv``: the worker with the lowest
``overlap-score-weight * new_prefill_blocks + active_decode_blocks`` (kv_router/).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping
from typing import Any

from servegrid.components.worker import Worker
from servegrid.distributed.errors import NoInstancesError
from servegrid.errors import NoWorkersError
from servegrid.kv_router.config import KvRouterConfig
from servegrid.kv_router.router import KvRouter, start_kv_router
from servegrid.llm.protocol import RouteRequest, RouteResponse
from servegrid.sdk import (
    ServiceConfig,
    async_on_shutdown,
    async_on_start,
    depends,
    endpoint,
    service,
)
from servegrid.sdk.errors import ConfigError
from servegrid.sdk.service import address, spec_of

ROUTER_MODES = ("random", "round-robin", "kv")

# How long a request waits for a worker to appear before it is refused with 503. Covers the
# moment after a worker (re)starts that this process's discovery watch has not yet seen, and
# lets a migrating stream wait for a restarted worker instead of failing at once.
WORKER_WAIT_S = 5.0


async def live_worker_ids(workers: Any) -> list[int]:
    """The live instances of a worker client; when there are none, wait briefly for one."""
    ids = workers.instance_ids()
    if ids:
        return ids
    with contextlib.suppress(NoInstancesError):
        return await workers.wait_for_instances(1, WORKER_WAIT_S)
    return []


class WorkerPicker:
    """Chooses a worker in one of ``ROUTER_MODES`` (shared by the Router and the Processor).

    ``settings`` is the owning service's config section; in ``kv`` mode the KV router's keys
    are read from it (kv_router/config.py). ``start`` must run before ``pick`` in ``kv`` mode.
    """

    def __init__(
        self, mode: str, settings: Mapping[str, Any] | None = None, where: str = "router"
    ) -> None:
        if mode not in ROUTER_MODES:
            modes = ", ".join(ROUTER_MODES)
            raise ConfigError(f"{where}: router mode {mode!r} is not one of: {modes}")
        self.mode = mode
        self._next = 0
        self.kv_config = None
        if mode == "kv":
            self.kv_config = KvRouterConfig.from_settings(settings or {}, where)
        self.kv: KvRouter | None = None

    async def start(self, worker_service: type) -> None:
        if self.kv_config is not None and self.kv is None:
            namespace, component = address(worker_service)
            self.kv = await start_kv_router(self.kv_config, namespace, component)

    async def stop(self) -> None:
        if self.kv is not None:
            await self.kv.close()
            self.kv = None

    def pick(self, instance_ids: list[int]) -> int:
        """Random or round-robin choice (the modes that do not look at the prompt)."""
        if not instance_ids:
            raise NoWorkersError("no worker is registered; start a Worker (or wait for one)")
        if self.mode == "random":
            return random.choice(instance_ids)
        self._next += 1
        return instance_ids[self._next % len(instance_ids)]

    def state(self) -> dict:
        state: dict[str, Any] = {"mode": self.mode}
        if self.kv is not None:
            state.update(self.kv.state())
        return state

    def route(self, request: RouteRequest, instance_ids: list[int]) -> RouteResponse:
        if self.kv is None:
            return RouteResponse(worker_id=self.pick(instance_ids))
        if not instance_ids:
            raise NoWorkersError("no worker is registered; start a Worker (or wait for one)")
        decision = self.kv.route(request.token_ids, instance_ids, request.request_id)
        return RouteResponse(worker_id=decision.worker_id, overlap_blocks=decision.overlap_blocks)


@service()
class Router:
    worker = depends(Worker)

    def __init__(self, router_mode: str = "round-robin") -> None:
        name = spec_of(type(self)).name
        settings = ServiceConfig.get_instance().settings(name)
        self.picker = WorkerPicker(router_mode, settings, name)
        self._workers = None

    @async_on_start
    async def start_router(self) -> None:
        self._workers = await self.worker.client("generate")
        await self.picker.start(Worker)

    @async_on_shutdown
    async def stop_router(self) -> None:
        await self.picker.stop()

    @endpoint()
    async def route(self, request: RouteRequest) -> RouteResponse:
        if self._workers is None:
            self._workers = await self.worker.client("generate")
        return self.picker.route(request, await live_worker_ids(self._workers))

    @endpoint()
    async def state(self, _: None = None) -> dict:
        """The router's view: mode and, under ``kv``, each worker's indexed blocks and load."""
        if self._workers is not None and self.picker.kv is not None:
            # membership is otherwise checked per decision; a state query sees it current
            self.picker.kv.update_members(self._workers.instance_ids())
        return self.picker.state()
