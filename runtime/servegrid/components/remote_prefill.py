"""Conditional disaggregation in the decode Worker: prefill here, or on a prefill worker.

A prompt goes to the prefill queue when what this worker's cache lacks of it is long,
``prompt_len * (1 - prefix_hit_rate) > max-local-prefill-length``, a prefill worker is
registered and the queue holds fewer than ``max-prefill-queue-size`` items; otherwise it is
prefilled here. A remote prefill reserves this worker's blocks first, and when its KV has not
arrived ``remote-prefill-timeout`` seconds later (its prefill worker died and no other took the
item in time, say) the reservation is dropped and the prompt prefilled here: never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from servegrid.components.prefill_queue import PREFILL_QUEUE, PrefillQueueItem, encode_item
from servegrid.distributed.events import WorkQueue
from servegrid.engines.base import EngineOutput, EngineRequest
from servegrid.engines.disagg import KvReservation, KvTransferEngine
from servegrid.kv_transfer import KvReceiver, RemotePrefillFailedError
from servegrid.sdk.errors import ConfigError

log = logging.getLogger(__name__)

# Decisions, as counted in ``stats``: where a prompt's prefill ran and why.
REMOTE = "remote"  # prefilled by a prefill worker; decoded from its blocks
LOCAL_SHORT = "local_short"  # the uncached part of the prompt is short (or a high prefix hit)
LOCAL_NO_PREFILL_WORKER = "local_no_prefill_worker"
LOCAL_QUEUE_FULL = "local_queue_full"
LOCAL_NO_BLOCKS = "local_no_blocks"  # no room to reserve the blocks now
LOCAL_QUEUE_ERROR = "local_queue_error"  # NATS could not take the item
LOCAL_DEADLINE = "local_deadline"  # the KV did not arrive in time
LOCAL_PREFILL_FAILED = "local_prefill_failed"  # the prefill worker reported a failure


@dataclass(frozen=True)
class DisaggSettings:
    max_local_prefill_length: int = 512
    max_prefill_queue_size: int = 2
    remote_prefill_timeout: float = 30.0

    def check(self, service: str) -> None:
        if self.max_local_prefill_length < 0 or self.max_prefill_queue_size < 1:
            raise ConfigError(
                f"{service}: max-local-prefill-length must be >= 0 and max-prefill-queue-size >= 1"
            )
        if self.remote_prefill_timeout <= 0:
            raise ConfigError(f"{service}: remote-prefill-timeout must be positive seconds")


class RemotePrefill:
    """Decides per request and runs the remote path; owns the KV receiver and the queue."""

    def __init__(
        self, engine: KvTransferEngine, settings: DisaggSettings, prefill_address: tuple[str, str]
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.namespace, self.prefill_component = prefill_address
        self.stats: Counter[str] = Counter()
        self.receiver: KvReceiver | None = None
        self.instance_id = 0
        self._queue: WorkQueue | None = None
        self._prefill_workers: Any = None

    async def start(self, runtime: Any, instance_id: int = 0) -> None:
        self.instance_id = instance_id
        self.receiver = KvReceiver(
            self.engine,
            runtime.server.host,
            runtime.advertise_host,
            secret=runtime.cluster_secret,
        )
        await self.receiver.start()
        queue = await runtime.namespace(self.namespace).work_queue(PREFILL_QUEUE, ack_wait=None)
        await queue.start()
        self._queue = queue
        self._prefill_workers = await runtime.client(
            self.namespace, self.prefill_component, "status"
        )

    async def stop(self) -> None:
        if self.receiver is not None:
            await self.receiver.stop()

    def snapshot(self) -> dict:
        receiver = self.receiver
        return {
            "decisions": dict(self.stats),
            "queue": {"namespace": self.namespace, "name": PREFILL_QUEUE},
            "transfers_received": receiver.transfers_received if receiver else 0,
            "logical_bytes_received": receiver.logical_bytes_received if receiver else 0,
            "refused_transfers": receiver.refused if receiver else 0,
        }

    async def _decide(self, request: EngineRequest) -> str | None:
        """None: go remote; else the reason to prefill locally."""
        prompt = request.token_ids
        uncached = len(prompt) - self.engine.prefix_hit_tokens(prompt)
        if uncached <= self.settings.max_local_prefill_length:
            return LOCAL_SHORT
        if not self._prefill_workers or not self._prefill_workers.instance_ids():
            return LOCAL_NO_PREFILL_WORKER
        assert self._queue is not None
        try:
            depth = await self._queue.depth()
        except Exception as exc:
            log.warning("prefill queue depth unknown (%s); prefilling locally", exc)
            return LOCAL_QUEUE_ERROR
        if depth >= self.settings.max_prefill_queue_size:
            return LOCAL_QUEUE_FULL
        return None

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        reason = await self._decide(request)
        reservation = None
        if reason is None:
            reservation = self.engine.reserve_kv(request)
            if reservation is None:
                reason = LOCAL_NO_BLOCKS
        if reservation is not None:
            reason = await self._remote_prefill(request, reservation)
        self.stats[reason] += 1
        if reason == REMOTE:
            assert reservation is not None
            stream = self.engine.generate_reserved(reservation)
        else:
            stream = self.engine.generate(request)
        try:
            async for output in stream:
                yield output
        finally:
            await stream.aclose()
            if reservation is not None:
                self.engine.release_kv(reservation)  # no-op once decoding took the blocks

    async def _remote_prefill(self, request: EngineRequest, reservation: KvReservation) -> str:
        """Enqueue, wait for the KV; REMOTE when it is committed, else the local reason."""
        receiver, queue = self.receiver, self._queue
        assert receiver is not None and queue is not None
        target, arrived = receiver.expect(reservation)
        timeout = self.settings.remote_prefill_timeout
        item = PrefillQueueItem(request, target, time.time() + timeout, self.instance_id)
        try:
            try:
                await queue.enqueue(encode_item(item))
            except Exception as exc:
                log.warning("request %s: prefill queue refused (%s)", request.request_id, exc)
                return LOCAL_QUEUE_ERROR
            try:
                await asyncio.wait_for(asyncio.shield(arrived), timeout)
                return REMOTE
            except TimeoutError:
                if not receiver.withdraw(target.transfer_id):
                    # It arrived as the deadline struck and is being written: take it.
                    with contextlib.suppress(RemotePrefillFailedError):
                        await arrived
                        return REMOTE
                log.warning(
                    "request %s: no KV from a prefill worker within %.1fs; prefilling locally",
                    request.request_id,
                    timeout,
                )
                return LOCAL_DEADLINE
            except RemotePrefillFailedError as exc:
                log.warning("request %s: remote prefill failed (%s)", request.request_id, exc)
                return LOCAL_PREFILL_FAILED
        finally:
            receiver.withdraw(target.transfer_id)
            if not reservation.committed:
                self.engine.release_kv(reservation)
