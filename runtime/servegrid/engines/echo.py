"""The echo engine: streams the prompt's token ids back, one per step, for protocol tests.

It ends with ``"length"`` when it reaches ``max_tokens`` and ``"stop"`` when it runs out of
prompt first. ``echo-delay-ms`` (default 0) spaces the tokens out in time, to test
streaming and cancellation; with 0 each token still yields to the event loop once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from servegrid.engines.base import (
    Engine,
    EngineConfigError,
    EngineOutput,
    EngineRequest,
    EngineRequestError,
    LoadMetrics,
)


class EchoEngine(Engine):
    def __init__(self, delay_s: float = 0.0) -> None:
        self._delay_s = delay_s
        self._active = 0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def load_metrics(self) -> LoadMetrics:
        return LoadMetrics(active_requests=self._active)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        prompt = request.token_ids
        limit = request.sampling.max_tokens
        if not prompt:
            raise EngineRequestError(f"request {request.request_id}: the prompt is empty")
        if limit < 1:
            raise EngineRequestError(
                f"request {request.request_id}: max_tokens must be at least 1, got {limit}"
            )
        count = min(len(prompt), limit)
        last_reason = "length" if limit <= len(prompt) else "stop"
        self._active += 1
        try:
            for i in range(count):
                await asyncio.sleep(self._delay_s)
                yield EngineOutput([prompt[i]], last_reason if i == count - 1 else None)
        finally:
            self._active -= 1


def create(config: Mapping[str, Any]) -> EchoEngine:
    raw = config.get("echo-delay-ms", 0)
    try:
        delay_ms = float(raw)
    except (TypeError, ValueError):
        raise EngineConfigError(f"echo: echo-delay-ms must be a number, got {raw!r}") from None
    if delay_ms < 0:
        raise EngineConfigError(f"echo: echo-delay-ms must not be negative, got {delay_ms}")
    return EchoEngine(delay_ms / 1000.0)
