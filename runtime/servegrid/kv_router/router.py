"""The KV-aware router: index + load + selection, fed from the event plane.

``KvRouter`` holds no sockets: it is fed event and load payloads and the current list of
workers, and answers ``route``. ``start_kv_router`` binds one to a process's runtime: it
subscribes to the workers' subjects before it asks any worker for a snapshot (so nothing
falls between a snapshot and the first batch after it), and fetches snapshots from the
workers' ``kv_blocks`` endpoint. A router that starts (or restarts) knows no worker, so its
first look at the membership asks every worker for its blocks: it rebuilds its view the
way it recovers from a gap. Two routers fed by the same subjects hold the same index.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import msgspec

from servegrid.kv_router.config import KvRouterConfig
from servegrid.kv_router.indexer import ApproxIndexer, KvIndexer
from servegrid.kv_router.protocol import (
    KV_BLOCKS_ENDPOINT,
    KvSnapshot,
    decode_batch,
    decode_load,
    kv_events_subject,
    kv_load_subject,
)
from servegrid.kv_router.scheduler import LoadTracker, choose, costs
from servegrid.kv_router.sync import EventSync
from servegrid.llm.kv_hash import block_hashes

log = logging.getLogger(__name__)

FetchSnapshot = Callable[[int], Awaitable[KvSnapshot]]

SNAPSHOT_TIMEOUT = 10.0
SNAPSHOT_RETRY = 1.0  # seconds before asking a worker again after a failed snapshot
DEPARTED_MEMORY = 1024  # recently departed workers whose late frames are ignored


@dataclass(slots=True)
class RouteDecision:
    worker_id: int
    overlap_blocks: int  # leading prompt blocks the chosen worker already holds
    prompt_blocks: int


class KvRouter:
    def __init__(
        self,
        config: KvRouterConfig,
        fetch_snapshot: FetchSnapshot | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._fetch = fetch_snapshot
        self._rng = rng or random.Random()
        self._clock = clock
        self.indexer: KvIndexer = (
            KvIndexer() if config.use_kv_events else ApproxIndexer(config.router_ttl, clock)
        )
        self.loads = LoadTracker(clock)
        self.sync = EventSync(self.indexer, self._request_snapshot)
        self._members: set[int] = set()
        self._members_seen: Sequence[int] | None = None
        self._departed: OrderedDict[int, None] = OrderedDict()
        self._retry_at: dict[int, float] = {}
        self._tasks: set[asyncio.Task] = set()
        self.decisions = 0
        self.bad_frames = 0

    # -- feeding -------------------------------------------------------------------------
    def on_events(self, payload: bytes) -> None:
        try:
            batch = decode_batch(payload)
        except msgspec.DecodeError:
            self.bad_frames += 1
            return
        if batch.worker_id in self._departed:
            return
        self.sync.on_batch(batch)

    def on_load(self, payload: bytes) -> None:
        try:
            report = decode_load(payload)
        except msgspec.DecodeError:
            self.bad_frames += 1
            return
        if report.worker_id not in self._departed:
            self.loads.on_report(report)

    def update_members(self, worker_ids: Sequence[int]) -> None:
        """The workers in discovery now: forget those that left, sync those that came."""
        if worker_ids is self._members_seen:  # clients hand out the same list until it changes
            return
        self._members_seen = worker_ids
        current = set(worker_ids)
        for worker in self._members - current:
            self._forget(worker)
        for worker in current - self._members:
            self._departed.pop(worker, None)
            if self.config.use_kv_events and not self.sync.in_sync(worker):
                self.sync.request(worker)
        self._members = current

    def _forget(self, worker: int) -> None:
        self.sync.forget(worker)
        self.loads.forget(worker)
        self._retry_at.pop(worker, None)
        self._departed[worker] = None
        if len(self._departed) > DEPARTED_MEMORY:
            self._departed.popitem(last=False)

    # -- deciding ------------------------------------------------------------------------
    def route(
        self, token_ids: Sequence[int], worker_ids: Sequence[int], request_id: str = ""
    ) -> RouteDecision:
        self.update_members(worker_ids)
        if self._retry_at:
            self._retry_failed_snapshots()
        cfg = self.config
        hashes = block_hashes(token_ids, cfg.block_size)
        overlaps = self.indexer.overlaps(hashes)
        loads = self.loads
        loads.expire()
        in_use = loads.in_use_prefix(hashes)
        prompt_blocks = len(hashes)
        # Once admitted the request holds its prompt and its first output token.
        request_blocks = -(-(len(token_ids) + 1) // cfg.block_size)
        worker_costs = costs(
            worker_ids,
            overlaps,
            in_use,
            prompt_blocks,
            request_blocks,
            loads.load,
            cfg.overlap_score_weight,
        )
        worker = choose(worker_ids, worker_costs, cfg.router_temperature, self._rng)
        # Until the worker's load report names this request, count what it adds there.
        loads.routed(
            worker,
            request_id,
            request_blocks - in_use.get(worker, 0),
            hashes,
            max(in_use.values(), default=0),
        )
        if isinstance(self.indexer, ApproxIndexer):
            self.indexer.routed(worker, hashes)
        self.decisions += 1
        return RouteDecision(worker, overlaps.get(worker, 0), prompt_blocks)

    # -- re-synchronisation --------------------------------------------------------------
    def _request_snapshot(self, worker: int) -> None:
        if self._fetch is None:
            self.sync.on_snapshot_failed(worker)
            return
        task = asyncio.get_running_loop().create_task(self._resync(worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resync(self, worker: int) -> None:
        assert self._fetch is not None
        try:
            snapshot = await asyncio.wait_for(self._fetch(worker), SNAPSHOT_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("snapshot of worker %x failed (%s); retrying", worker, exc)
            self.sync.on_snapshot_failed(worker)
            if worker in self._members:
                self._retry_at[worker] = self._clock() + SNAPSHOT_RETRY
            return
        if worker in self._departed:
            return
        self.sync.on_snapshot(worker, snapshot)

    def _retry_failed_snapshots(self) -> None:
        now = self._clock()
        for worker, at in list(self._retry_at.items()):
            if at <= now:
                del self._retry_at[worker]
                if worker in self._members and not self.sync.in_sync(worker):
                    self.sync.request(worker)

    async def wait_synced(self, workers: Sequence[int], timeout: float) -> None:
        """Wait until every worker in ``workers`` is in step (tests, benchmarks)."""
        deadline = self._clock() + timeout
        self.update_members(list(workers))
        while not all(self.sync.in_sync(w) for w in workers):
            if self._clock() > deadline:
                raise TimeoutError(f"workers not in sync after {timeout}s")
            self._retry_failed_snapshots()
            await asyncio.sleep(0.02)

    def state(self) -> dict:
        """What this router knows, per worker (hex id): indexed blocks, in step, load, running."""
        workers = set(self._members) | set(self.indexer.workers())
        return {
            "decisions": self.decisions,
            "use_kv_events": self.config.use_kv_events,
            "workers": {
                f"{w:x}": {
                    "member": w in self._members,
                    "blocks": self.indexer.block_count(w),
                    "in_sync": self.sync.in_sync(w),
                    "active_blocks": self.loads.active_blocks(w),
                    # requests sent there that the worker has not reported finished
                    "running": self.loads.running(w),
                }
                for w in sorted(workers)
            },
        }

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class BoundKvRouter(KvRouter):
    """A ``KvRouter`` fed by a process's event plane (see ``start_kv_router``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions: list = []
        self._consumers: list[asyncio.Task] = []

    def _consume(self, subscription, handle: Callable[[bytes], None]) -> None:
        async def run() -> None:
            async for payload in subscription:
                handle(payload)

        self._subscriptions.append(subscription)
        self._consumers.append(asyncio.create_task(run(), name="kv-router-feed"))

    async def close(self) -> None:
        for task in self._consumers:
            task.cancel()
        for task in self._consumers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        await super().close()


async def start_kv_router(config: KvRouterConfig, namespace: str, component: str) -> KvRouter:
    """A KV router for the workers ``namespace.component``, fed by this process's runtime.

    Without an event plane (no ``NATS_SERVER``) it predicts caches from its own decisions.
    """
    from servegrid.sdk.context import servegrid_context

    runtime = servegrid_context.runtime
    if not runtime.nats_url:
        if config.use_kv_events:
            log.warning(
                "KV router: no event plane (NATS_SERVER unset); predicting caches from "
                "routing decisions instead (as with use-kv-events: false)"
            )
            config = config.model_copy(update={"use_kv_events": False})
        return KvRouter(config)

    snapshots = await runtime.client(namespace, component, KV_BLOCKS_ENDPOINT)

    async def fetch(worker: int) -> KvSnapshot:
        stream = await snapshots.direct(None, worker, KvSnapshot)
        try:
            async for snapshot in stream:
                return snapshot
        finally:
            await stream.aclose()
        raise ConnectionError(f"worker {worker:x} sent no snapshot")

    router = BoundKvRouter(config, fetch)
    plane = await runtime.event_plane()
    if config.use_kv_events:
        events = await plane.subscribe(kv_events_subject(namespace, component))
        router._consume(events, router.on_events)
    loads = await plane.subscribe(kv_load_subject(namespace, component))
    router._consume(loads, router.on_load)
    flush = getattr(plane, "flush", None)
    if flush is not None:  # the server has our subscriptions before we ask for snapshots
        await flush()
    return router
