"""PrefillWorker: computes prompts' KV caches for decode workers (disaggregated serving).

It pulls items from the namespace's prefill queue, runs the engine's prefill, ships the KV to
the decode worker that asked over the bulk path (``servegrid.kv_transfer``) and acks the item
only once that worker has committed it. A prefill worker that dies before the ack leaves the
item to be redelivered to another one after ``prefill-ack-wait`` seconds; the decode worker
meanwhile waits up to its own deadline and then prefills locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque

import msgspec

from servegrid.components.prefill_queue import (
    DEFAULT_ACK_WAIT_S,
    PrefillQueueItem,
    decode_item,
    open_prefill_queue,
)
from servegrid.distributed.events import WorkItem, WorkQueue
from servegrid.engines.base import EngineRequestError
from servegrid.engines.disagg import KvTransferEngine, supports_kv_transfer
from servegrid.engines.registry import create_engine
from servegrid.kv_transfer import KvTransferRefusedError, send_kv
from servegrid.llm.model_init import BUILTIN_MODEL
from servegrid.sdk import (
    ServiceConfig,
    async_on_drain,
    async_on_shutdown,
    async_on_start,
    endpoint,
    service,
)
from servegrid.sdk.context import servegrid_context
from servegrid.sdk.errors import ConfigError
from servegrid.sdk.service import address, spec_of

log = logging.getLogger(__name__)

HISTORY = 1000  # handled items kept for the status endpoint


class HandledPrefill(msgspec.Struct):
    request_id: str
    outcome: str  # "sent" | "refused" (decode worker gave up or is gone) | "expired" | "failed"
    deliveries: int  # 2 or more: this item was redelivered after a prefill worker died
    tokens: int  # prompt tokens whose KV was sent
    logical_bytes: int


@service(resources={"gpu": 1}, workers=1)
class PrefillWorker:
    """Serves the prefill queue; its ``status`` endpoint says what it handled."""

    def __init__(
        self,
        model: str = BUILTIN_MODEL,
        engine: str = "mocker",
        kv_transfer_bandwidth: float = 25.0,
        prefill_ack_wait: float = DEFAULT_ACK_WAIT_S,
        max_concurrent_prefills: int = 4,
    ) -> None:
        name = spec_of(type(self)).name
        if kv_transfer_bandwidth <= 0:
            raise ConfigError(f"{name}.kv-transfer-bandwidth must be positive GB/s")
        if prefill_ack_wait <= 0 or max_concurrent_prefills < 1:
            raise ConfigError(
                f"{name}: prefill-ack-wait must be positive and max-concurrent-prefills at least 1"
            )
        settings = ServiceConfig.get_instance().settings(name)
        self.engine_name = engine
        self.engine = create_engine(engine, {**settings, "model": model})
        if not supports_kv_transfer(self.engine):
            raise ConfigError(
                f"{name}: engine {engine!r} cannot prefill for another worker (no KV transfer)"
            )
        self.kv_engine: KvTransferEngine = self.engine  # type: ignore[assignment]
        self.bandwidth = kv_transfer_bandwidth * 1e9  # the mocker's simulated link, bytes/s
        self.ack_wait = prefill_ack_wait
        self.slots = asyncio.Semaphore(max_concurrent_prefills)
        self.handled: deque[HandledPrefill] = deque(maxlen=HISTORY)
        self.in_flight: set[str] = set()  # request ids
        self._transfers_in_flight: set[str] = set()  # their items' transfer ids
        self._queue: WorkQueue | None = None
        self._puller: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False

    def instance_metadata(self) -> dict:
        return {"engine": self.engine_name, "role": "prefill"}

    @async_on_start
    async def start_pulling(self) -> None:
        await self.engine.start()
        namespace, _ = address(type(self))
        self._queue = await open_prefill_queue(
            servegrid_context.runtime, namespace, ack_wait=self.ack_wait
        )
        self._puller = asyncio.create_task(self._pull(), name="prefill-queue-pull")

    @async_on_drain
    async def finish_prefills(self, timeout: float) -> None:
        """A stop began: take no new item; finish (send and ack) those taken, in ``timeout``."""
        await self._stop_pulling()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)

    @async_on_shutdown
    async def stop_pulling(self) -> None:
        # The drain hook already gave in-flight prefills drain-timeout to finish; what is still
        # running now is cut, and its unacked queue item is redelivered to another worker.
        await self._stop_pulling()
        for task in self._tasks:
            task.cancel()
        await self.engine.stop()

    async def _stop_pulling(self) -> None:
        self._stopping = True
        if self._puller is not None:
            self._puller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._puller

    @endpoint()
    async def status(self, _: None = None) -> dict:
        """What this prefill worker did (tests and operators read it)."""
        return {
            "pid": os.getpid(),
            "in_flight": sorted(self.in_flight),
            "handled": [msgspec.to_builtins(h) for h in self.handled],
        }

    async def _pull(self) -> None:
        queue = self._queue
        assert queue is not None
        while not self._stopping:
            await self.slots.acquire()
            try:
                item = await queue.dequeue(timeout=1.0)
            except Exception as exc:  # NATS away: it reconnects by itself
                self.slots.release()
                log.warning("prefill queue: %s; retrying", exc)
                await asyncio.sleep(1.0)
                continue
            if item is None:
                self.slots.release()
                continue
            task = asyncio.create_task(self._handle(item))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self.slots.release()

    async def _handle(self, item: WorkItem) -> None:
        try:
            job = decode_item(item.data)
        except msgspec.DecodeError as exc:
            log.warning("dropping a malformed prefill queue item: %s", exc)
            await item.ack()
            return
        request_id = job.request.request_id
        transfer_id = job.target.transfer_id
        deliveries = int(getattr(item, "deliveries", 1))
        if transfer_id in self._transfers_in_flight:
            # A copy of an item this worker is still on (redelivered after a lost ack or a
            # missed heartbeat): the handler at work acks the item; computing it again would
            # only be refused by the decode worker.
            log.info("%s: a second delivery while its prefill runs here; skipped", request_id)
            return
        if time.time() > job.deadline:
            # Its decode worker has prefilled locally already; the KV would be refused.
            self._record(job, "expired", deliveries, 0)
            await item.ack()
            return
        self.in_flight.add(request_id)
        self._transfers_in_flight.add(transfer_id)
        heartbeat = asyncio.create_task(self._heartbeat(item))
        try:
            outcome, logical = await self._prefill_and_send(job, deliveries)
        except Exception:
            log.exception("prefill of %s failed; giving it back to the queue", request_id)
            with contextlib.suppress(Exception):
                await item.nak()
            return
        finally:
            heartbeat.cancel()
            self.in_flight.discard(request_id)
            self._transfers_in_flight.discard(transfer_id)
        self._record(job, outcome, deliveries, logical)
        await item.ack()

    async def _prefill_and_send(self, job: PrefillQueueItem, deliveries: int) -> tuple[str, int]:
        target = job.target
        try:
            kv = await self.kv_engine.prefill_kv(job.request, target.first_token, target.num_tokens)
        except EngineRequestError as exc:
            # This request can never be prefilled: tell the decode worker now, not at its deadline.
            with contextlib.suppress(KvTransferRefusedError):
                await send_kv(target, None, error=str(exc))
            return "failed", 0
        try:
            await send_kv(target, kv, bandwidth_bytes_per_s=self.bandwidth)
        except KvTransferRefusedError as exc:
            log.info("KV of %s not taken: %s", job.request.request_id, exc)
            return "refused", 0
        finally:
            kv.release()
        # One line per accepted transfer: a request whose stream moved to another decode
        # worker (migration) is prefilled there again, under a new transfer id.
        log.info(
            "prefilled %s: tokens %d..%d (%d bytes) sent to decode worker %x, transfer %s%s",
            job.request.request_id,
            target.first_token,
            target.num_tokens,
            kv.logical_bytes,
            job.decode_instance,
            target.transfer_id,
            f" (delivery {deliveries})" if deliveries > 1 else "",
        )
        return "sent", kv.logical_bytes

    async def _heartbeat(self, item: WorkItem) -> None:
        progress = getattr(item, "in_progress", None)
        if progress is None:
            return
        while True:
            await asyncio.sleep(self.ack_wait / 3)
            with contextlib.suppress(Exception):
                await progress()

    def _record(self, job: PrefillQueueItem, outcome: str, deliveries: int, logical: int) -> None:
        tokens = job.target.num_tokens - job.target.first_token if outcome == "sent" else 0
        self.handled.append(
            HandledPrefill(job.request.request_id, outcome, deliveries, tokens, logical)
        )
