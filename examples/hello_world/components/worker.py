"""DummyWorker: the decode (or, alone, the whole) worker. Its "generation" names its host.

With ``remote-prefill: true`` and a PrefillWorker registered, it pushes the prompt to the
prefill queue and waits for the prefill worker's done event (prefilling itself if none comes
within ``prefill-timeout``), then "decodes".
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

import msgspec

from components.prefill_worker import PrefillWorker
from components.protocol import (
    NAMESPACE,
    PREFILL_DONE,
    PREFILL_QUEUE,
    GenerateReply,
    GenerateRequest,
    PrefillJob,
)
from servegrid.sdk import async_on_start, depends, endpoint, servegrid_context, service

log = logging.getLogger("hello.worker")


@service(namespace=NAMESPACE)
class DummyWorker:
    prefill_worker = depends(PrefillWorker)

    def __init__(
        self, hostname: str = "", remote_prefill: bool = False, prefill_timeout: float = 5.0
    ) -> None:
        self.hostname = hostname or socket.gethostname()  # set it to tell workers apart
        self.remote_prefill = remote_prefill
        self.prefill_timeout = prefill_timeout
        self.waiting: dict[str, asyncio.Future[None]] = {}
        self.watcher: asyncio.Task | None = None

    @async_on_start
    async def start(self) -> None:
        if not self.remote_prefill:
            return
        ns = servegrid_context.runtime.namespace(NAMESPACE)
        self.queue = await ns.work_queue(PREFILL_QUEUE)
        self.prefill_workers = await self.prefill_worker.client("status")
        self.done_events = await ns.subscribe(PREFILL_DONE)
        self.watcher = asyncio.create_task(self.watch_done())

    async def watch_done(self) -> None:
        async for payload in self.done_events:
            future = self.waiting.pop(payload.decode(), None)
            if future is not None and not future.done():
                future.set_result(None)

    async def prefill_remotely(self, request: GenerateRequest) -> bool:
        if not self.remote_prefill or not self.prefill_workers.instance_ids():
            return False
        done = asyncio.get_running_loop().create_future()
        self.waiting[request.request_id] = done
        job = PrefillJob(request.prompt, request.request_id)
        await self.queue.enqueue(msgspec.json.encode(job))
        log.info("pushed %s to the prefill queue", request.request_id)
        try:
            await asyncio.wait_for(done, self.prefill_timeout)
            return True
        except TimeoutError:
            self.waiting.pop(request.request_id, None)
            return False

    @endpoint()
    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateReply]:
        if not await self.prefill_remotely(request):
            await asyncio.sleep(0.01)  # the local prefill this demo skips
        yield GenerateReply(f"{request.prompt}_GeneratedBy_{self.hostname}", request.request_id)
