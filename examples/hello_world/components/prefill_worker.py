"""PrefillWorker: pulls jobs from the prefill queue, "prefills" them, says when it is done.

A real prefill worker computes the prompt's KV cache and ships it to the decode worker; this
one sleeps a moment instead. It acks a job only after announcing it done, so a prefill worker
that dies mid-job leaves the job to another one (the queue redelivers unacked jobs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec

from components.protocol import NAMESPACE, PREFILL_DONE, PREFILL_QUEUE, PrefillJob
from servegrid.sdk import async_on_shutdown, async_on_start, endpoint, servegrid_context, service

log = logging.getLogger("hello.prefill")


@service(namespace=NAMESPACE)
class PrefillWorker:
    def __init__(self, prefill_seconds: float = 0.05) -> None:
        self.prefill_seconds = prefill_seconds
        self.done = 0
        self._task: asyncio.Task | None = None

    @async_on_start
    async def start(self) -> None:
        ns = servegrid_context.runtime.namespace(NAMESPACE)
        self.queue = await ns.work_queue(PREFILL_QUEUE)
        self._task = asyncio.create_task(self.pull())

    @async_on_shutdown
    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def pull(self) -> None:
        ns = servegrid_context.runtime.namespace(NAMESPACE)
        while True:
            item = await self.queue.dequeue(timeout=1.0)
            if item is None:
                continue
            job = msgspec.json.decode(item.data, type=PrefillJob)
            await asyncio.sleep(self.prefill_seconds)  # the prefill this demo skips
            await ns.publish(PREFILL_DONE, job.request_id.encode())
            await item.ack()
            self.done += 1
            log.info("prefilled %s", job.request_id)

    @endpoint()
    async def status(self, _: None = None) -> dict:
        """Registers the prefill worker in discovery (decode workers look for one)."""
        return {"prefilled": self.done}
