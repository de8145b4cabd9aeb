"""Processor: asks the Router which worker should serve a prompt, then calls that worker."""

from __future__ import annotations

from collections.abc import AsyncIterator

from components.protocol import NAMESPACE, GenerateReply, GenerateRequest
from components.router import Router
from components.worker import DummyWorker
from servegrid.sdk import depends, endpoint, service


@service(namespace=NAMESPACE)
class Processor:
    router = depends(Router)
    worker = depends(DummyWorker)

    @endpoint()
    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateReply]:
        # A real processor would tokenize here and detokenize on the way back.
        worker_id = await self.router.route(request.prompt)
        async for reply in self.worker.direct(worker_id).generate(request):
            yield reply
