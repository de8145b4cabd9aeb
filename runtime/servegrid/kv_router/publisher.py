"""The worker side of the KV event plane: number and publish an engine's KV events and load.

Events the engine reports during one event-loop iteration go out as one ``KvEventBatch``
(the next sequence number); one sender task publishes batches in order. Load reports go out
at most every ``load_interval`` seconds, when something changed, and at least every
``heartbeat`` seconds so that a router started later learns every worker's load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from servegrid.engines.base import Engine, KvEvent
from servegrid.kv_router.protocol import (
    KvEventBatch,
    KvSnapshot,
    LoadReport,
    encode,
    kv_events_subject,
    kv_load_subject,
)

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], Awaitable[None]]

LOAD_INTERVAL = 0.05
HEARTBEAT = 1.0
MAX_RECEIVED_IDS = 4096  # per report; beyond that a router's in-flight expiry covers the rest


class KvPublisher:
    def __init__(
        self,
        engine: Engine,
        publish: Publish,
        *,
        namespace: str,
        component: str,
        worker_id: int,
        load_interval: float = LOAD_INTERVAL,
        heartbeat: float = HEARTBEAT,
    ) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self._publish = publish
        self._events_subject = kv_events_subject(namespace, component)
        self._load_subject = kv_load_subject(namespace, component)
        self._load_interval = load_interval
        self._heartbeat = heartbeat
        self.seq = 0  # number of the last batch handed to the sender
        self._pending: list[KvEvent] = []
        self._flush_scheduled = False
        self._received: list[str] = []
        self._finished: list[str] = []
        self._outbox: deque[tuple[str, bytes]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # set by the sender whenever the outbox is empty
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self.engine.set_kv_event_sink(self._on_event)
        self._tasks = [
            asyncio.create_task(self._send_loop(), name="kv-publish"),
            asyncio.create_task(self._load_loop(), name="kv-load"),
        ]

    async def stop(self) -> None:
        self.engine.set_kv_event_sink(None)
        self._flush()
        # Give what is queued a moment to leave; a router re-synchronises anyway.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained(), 1.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _drained(self) -> None:
        if self._outbox:
            self._idle.clear()
            await self._idle.wait()

    # -- KV events -----------------------------------------------------------------------
    def _on_event(self, event: KvEvent) -> None:
        self._pending.append(event)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending:
            return
        events, self._pending = self._pending, []
        self.seq += 1
        self._queue(self._events_subject, encode(KvEventBatch(self.worker_id, self.seq, events)))

    def snapshot(self) -> KvSnapshot:
        """Every block held now and the number of the last batch that already reflects it."""
        self._flush()  # events reported so far get a number the snapshot covers
        return KvSnapshot(self.worker_id, self.seq, self.engine.cached_block_hashes())

    # -- load ----------------------------------------------------------------------------
    def note_request(self, request_id: str) -> None:
        """A request reached this worker; the next load report names it."""
        if len(self._received) < MAX_RECEIVED_IDS:
            self._received.append(request_id)

    def note_finished(self, request_id: str) -> None:
        """A request's stream ended here; the next load report names it."""
        if len(self._finished) < MAX_RECEIVED_IDS:
            self._finished.append(request_id)

    def load_report(self) -> LoadReport:
        m = self.engine.load_metrics()
        received, self._received = self._received, []
        finished, self._finished = self._finished, []
        return LoadReport(
            self.worker_id,
            m.active_blocks,
            m.total_blocks,
            m.active_requests,
            m.waiting_requests,
            received,
            finished,
        )

    async def _load_loop(self) -> None:
        last: tuple[int, int, int] | None = None
        last_sent = 0.0
        while True:
            await asyncio.sleep(self._load_interval)
            m = self.engine.load_metrics()
            state = (m.active_blocks, m.active_requests, m.waiting_requests)
            now = time.monotonic()
            news = self._received or self._finished
            if state == last and not news and now - last_sent < self._heartbeat:
                continue
            last, last_sent = state, now
            self._queue(self._load_subject, encode(self.load_report()))

    # -- sending -------------------------------------------------------------------------
    def _queue(self, subject: str, payload: bytes) -> None:
        self._outbox.append((subject, payload))
        self._wake.set()

    async def _send_loop(self) -> None:
        outbox = self._outbox
        while True:
            if not outbox:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            subject, payload = outbox[0]
            try:
                await self._publish(subject, payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS buffers while reconnecting; this is rarer
                log.warning("KV event publish failed (%s); routers will re-synchronise", exc)
            outbox.popleft()


async def start_publisher(service: object, engine: Engine) -> KvPublisher | None:
    """Publish ``engine``'s KV events and load as the hosted ``service`` (a Worker).

    None when the process has no event plane (no ``NATS_SERVER``): routers then fall back to
    predicting caches from their own decisions.
    """
    from servegrid.sdk.context import servegrid_context
    from servegrid.sdk.service import address

    runtime = servegrid_context.runtime
    namespace, component = address(type(service))
    if not runtime.nats_url:
        log.info("%s: no event plane (NATS_SERVER unset); KV events are not published", component)
        return None
    plane = await runtime.event_plane()
    publisher = KvPublisher(
        engine,
        plane.publish,
        namespace=namespace,
        component=component,
        worker_id=servegrid_context.instance_id(component),
    )
    publisher.start()
    return publisher
