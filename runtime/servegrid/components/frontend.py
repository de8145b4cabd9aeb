"""Frontend: the OpenAI-compatible HTTP server in front of the Processor.

The served models are what registered workers announce (their ``model`` metadata in
discovery), so ``/v1/models`` and model checks follow workers as they come and go. The LoRA
adapters workers announce are models too: a request whose ``model`` names one runs with that
adapter on its base model (``TextRequest.lora_name``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from pydantic import ValidationError

from servegrid.components.processor import Processor
from servegrid.distributed.discovery.base import InstanceInfo, instance_prefix
from servegrid.distributed.retry import Backoff
from servegrid.engines.lora import adapters_of
from servegrid.errors import ModelNotFoundError, NoWorkersError
from servegrid.http.errors import http_error_for
from servegrid.http.limits import DEFAULT_LIMITS as LIMITS
from servegrid.http.limits import HttpLimits
from servegrid.http.server import OpenAIHttpServer
from servegrid.llm.protocol import GenerateChunk, TextRequest
from servegrid.sdk import (
    async_on_drain,
    async_on_shutdown,
    async_on_start,
    depends,
    endpoint,
    service,
)
from servegrid.sdk.context import servegrid_context
from servegrid.sdk.errors import UserError

log = logging.getLogger(__name__)


class ModelWatcher:
    """Models announced by live instances of a namespace, kept current by a discovery watch:
    base models, then the LoRA adapters on them."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._instances: dict[str, InstanceInfo] = {}
        self._models: list[str] = []
        self._parents: dict[str, str] = {}  # adapter -> the base model it runs on
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        discovery = servegrid_context.runtime.discovery
        prefix = instance_prefix(self.namespace)
        backoff = Backoff(start=0.5, maximum=5.0)
        while True:
            try:
                async for event in discovery.watch(prefix):
                    backoff.reset()
                    if event.kind == "put" and event.instance is not None:
                        if event.instance.metadata.get("model"):
                            self._instances[event.key] = event.instance
                    else:
                        self._instances.pop(event.key, None)
                    self._update()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep what we knew; discovery may be back soon
                log.warning("model watch failed (%s); retrying", exc)
                await backoff.sleep()

    def _update(self) -> None:
        bases: set[str] = set()
        parents: dict[str, str] = {}
        for info in self._instances.values():
            base = info.metadata["model"]
            bases.add(base)
            for adapter in adapters_of(info.metadata):
                parents.setdefault(adapter, base)
        for base in bases:  # workers refuse such an adapter; the base model wins if one slips by
            parents.pop(base, None)
        self._parents = parents
        self._models = sorted(bases) + sorted(parents)

    @property
    def models(self) -> list[str]:
        return self._models

    def parent(self, model: str) -> str | None:
        """The base model of the LoRA adapter ``model``; None for a base model."""
        return self._parents.get(model)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@service()
class Frontend:
    processor = depends(Processor)

    def __init__(
        self,
        port: int = 8000,
        host: str = "0.0.0.0",
        # The HTTP limits (servegrid/http/limits.py says what each bounds); defaults from there.
        max_connections: int = LIMITS.max_connections,
        keepalive_timeout_s: float = LIMITS.keepalive_timeout_s,
        header_timeout_s: float = LIMITS.header_timeout_s,
        body_timeout_s: float = LIMITS.body_timeout_s,
        write_timeout_s: float = LIMITS.write_timeout_s,
        max_url_bytes: int = LIMITS.max_url_bytes,
        max_header_bytes: int = LIMITS.max_header_bytes,
        max_headers: int = LIMITS.max_headers,
        max_body_bytes: int = LIMITS.max_body_bytes,
    ) -> None:
        self.port = port
        self.host = host
        try:
            self.limits = HttpLimits(
                max_connections=max_connections,
                keepalive_timeout_s=keepalive_timeout_s,
                header_timeout_s=header_timeout_s,
                body_timeout_s=body_timeout_s,
                write_timeout_s=write_timeout_s,
                max_url_bytes=max_url_bytes,
                max_header_bytes=max_header_bytes,
                max_headers=max_headers,
                max_body_bytes=max_body_bytes,
            )
        except ValidationError as exc:
            problems = "; ".join(
                f"{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
                for e in exc.errors(include_url=False)
            )
            raise UserError(f"Frontend config: {problems}") from None
        self.http: OpenAIHttpServer | None = None
        self.watcher: ModelWatcher | None = None

    @async_on_start
    async def start_http(self) -> None:
        namespace, _ = type(self).address()
        self.watcher = ModelWatcher(namespace)
        self.watcher.start()
        self.http = OpenAIHttpServer(self, self.host, self.port, limits=self.limits)
        try:
            await self.http.start()
        except OSError as exc:  # port taken, bad address: restarting will not help
            raise UserError(f"Frontend: {exc.strerror or exc}") from exc
        log.info("OpenAI API on http://%s:%d/v1", self.host, self.http.port)

    @async_on_drain
    async def drain_http(self, timeout: float) -> None:
        """A stop began: accept no new connections; finish open responses (streams too)."""
        if self.http is not None:
            await self.http.stop(timeout)

    @async_on_shutdown
    async def stop_http(self) -> None:
        if self.http is not None:
            await self.http.stop()
        if self.watcher is not None:
            await self.watcher.stop()

    # -- OpenAIBackend -----------------------------------------------------------------
    def models(self) -> list[str]:
        return self.watcher.models if self.watcher is not None else []

    def model_parent(self, model: str) -> str | None:
        return self.watcher.parent(model) if self.watcher is not None else None

    async def generate(self, request: TextRequest) -> AsyncIterator[GenerateChunk]:
        models = self.models()
        if request.model not in models:
            if not models:
                error: Exception = NoWorkersError(
                    "no worker is serving any model yet; try again shortly"
                )
            else:
                error = ModelNotFoundError(
                    f"model {request.model!r} is not served here (models: {', '.join(models)})"
                )
            raise http_error_for(error) from None
        if self.model_parent(request.model) is not None:
            request.lora_name = request.model
        stream = self.processor.generate(request)
        first = True
        try:
            async for chunk in stream:
                if first:
                    first = False
                    if chunk.worker_id and self.http is not None:
                        self.http.metrics.record_route(chunk.worker_id, chunk.overlap_blocks)
                yield chunk
        except Exception as exc:
            # This service is the HTTP edge: domain errors become HTTP errors here.
            mapped = http_error_for(exc)
            if mapped is None or mapped is exc:
                raise
            raise mapped from exc
        finally:
            await stream.aclose()

    @endpoint()
    async def health(self, _: None = None) -> dict:
        return {"models": self.models(), "port": self.http.port if self.http else None}
