"""Worker: runs an engine; prefill and decode in one process (aggregated serving), or, with
``remote-prefill: true``, the decode side of disaggregated serving (``remote_prefill``)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator

from servegrid.components.prefill_worker import PrefillWorker
from servegrid.components.remote_prefill import DisaggSettings, RemotePrefill
from servegrid.engines.base import Engine, EngineOutput, EngineRequest
from servegrid.engines.disagg import supports_kv_transfer
from servegrid.engines.registry import create_engine
from servegrid.kv_router.protocol import KV_BLOCKS_ENDPOINT, KvSnapshot
from servegrid.kv_router.publisher import KvPublisher, start_publisher
from servegrid.llm.model_init import BUILTIN_MODEL
from servegrid.sdk import (
    ServiceConfig,
    async_on_shutdown,
    async_on_start,
    depends,
    endpoint,
    service,
)
from servegrid.sdk.context import servegrid_context
from servegrid.sdk.errors import ConfigError
from servegrid.sdk.service import address, spec_of

log = logging.getLogger(__name__)


@service(resources={"gpu": 1}, workers=1)
class Worker:
    """Serves ``generate`` (token ids in, token ids out) with the configured engine.

    Every key of the service's config reaches the engine (``block-size``,
    ``max-model-len``, ``speedup-ratio``...); the engine takes the ones it knows.
    """

    # Found through discovery and the prefill queue, not called: a graph links it so that
    # serving the graph starts prefill workers too.
    prefill_worker = depends(PrefillWorker)

    def __init__(
        self,
        model: str = BUILTIN_MODEL,
        engine: str = "mocker",
        served_model_name: str | None = None,
        remote_prefill: bool = False,
        max_local_prefill_length: int = DisaggSettings.max_local_prefill_length,
        max_prefill_queue_size: int = DisaggSettings.max_prefill_queue_size,
        remote_prefill_timeout: float = DisaggSettings.remote_prefill_timeout,
    ) -> None:
        self.model = model
        self.engine_name = engine
        self.served_model_name = served_model_name or model
        name = spec_of(type(self)).name
        settings = ServiceConfig.get_instance().settings(name)
        self.engine: Engine = create_engine(engine, {**settings, "model": model})
        self.kv_publisher: KvPublisher | None = None
        self.remote: RemotePrefill | None = None
        if remote_prefill:
            if not supports_kv_transfer(self.engine):
                raise ConfigError(
                    f"{name}: remote-prefill needs an engine that can take KV from a prefill "
                    f"worker; {engine!r} cannot"
                )
            disagg = DisaggSettings(
                max_local_prefill_length, max_prefill_queue_size, remote_prefill_timeout
            )
            disagg.check(name)
            self.remote = RemotePrefill(self.engine, disagg, address(PrefillWorker))  # type: ignore[arg-type]

    def instance_metadata(self) -> dict:
        """Registered with every endpoint: the frontend lists served models from this."""
        return {"model": self.served_model_name, "engine": self.engine_name}

    @async_on_start
    async def start_engine(self) -> None:
        await self.engine.start()
        self.kv_publisher = await start_publisher(self, self.engine)
        if self.remote is not None:
            await self.remote.start(servegrid_context.runtime, os.getpid())
        log.info("engine %s serving model %s", self.engine_name, self.served_model_name)

    @async_on_shutdown
    async def stop_engine(self) -> None:
        if self.kv_publisher is not None:
            await self.kv_publisher.stop()
        if self.remote is not None:
            await self.remote.stop()
        await self.engine.stop()

    @endpoint()
    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if self.kv_publisher is not None:
            self.kv_publisher.note_request(request.request_id)
        if self.remote is not None:
            stream = self.remote.generate(request)
        else:
            stream = self.engine.generate(request)
        try:
            async for output in stream:
                yield output
        finally:
            await stream.aclose()  # a cancelled caller frees the sequence at once
            if self.kv_publisher is not None:
                self.kv_publisher.note_finished(request.request_id)

    @endpoint()
    async def load(self, _: None = None) -> dict:
        """The engine's load (active blocks and requests, waiting requests)."""
        metrics = self.engine.load_metrics()
        return {
            "active_blocks": metrics.active_blocks,
            "total_blocks": metrics.total_blocks,
            "active_requests": metrics.active_requests,
            "waiting_requests": metrics.waiting_requests,
        }

    @endpoint(KV_BLOCKS_ENDPOINT)
    async def kv_blocks(self, _: None = None) -> KvSnapshot:
        """Every block hash the engine's cache holds (a KV router re-synchronising)."""
        if self.kv_publisher is not None:
            return self.kv_publisher.snapshot()
        return KvSnapshot(0, 0, self.engine.cached_block_hashes())

    @endpoint()
    async def disagg_stats(self, _: None = None) -> dict:
        """Where prompts were prefilled and why, and the KV this worker received."""
        if self.remote is None:
            return {"remote_prefill": False}
        return {"remote_prefill": True, **self.remote.snapshot()}
