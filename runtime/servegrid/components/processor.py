"""Processor: chat template and tokenization in, incremental detokenization out.

It asks the Router for a worker when the graph links one (``...link(Router).link(Worker)``),
else picks a worker itself (``router: random | round-robin | kv``), and then streams from that
worker directly: tokens never pass through the router.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from servegrid.components.router import Router, WorkerPicker
from servegrid.components.worker import Worker
from servegrid.engines.base import EngineOutput, EngineRequest, SamplingParams
from servegrid.http.errors import InvalidRequestError
from servegrid.llm.detokenizer import IncrementalDetokenizer
from servegrid.llm.model_init import BUILTIN_MODEL, ensure_model
from servegrid.llm.protocol import GenerateChunk, RouteRequest, RouteResponse, TextRequest
from servegrid.llm.tokenizer import ChatTemplateError, Tokenizer, load_tokenizer
from servegrid.sdk import ServiceConfig, async_on_start, depends, endpoint, service
from servegrid.sdk.graph import LINKS
from servegrid.sdk.service import spec_of


@service()
class Processor:
    worker = depends(Worker)
    router = depends(Router)

    def __init__(
        self,
        model: str = BUILTIN_MODEL,
        max_model_len: int = 4096,
        router: str = "round-robin",
        default_max_tokens: int = 256,
    ) -> None:
        self.model = model
        self.max_model_len = max_model_len
        self.default_max_tokens = default_max_tokens
        # With a Router linked in the graph, it decides; otherwise this picker does.
        self.use_router = Router in LINKS.edges.get(type(self), [])
        settings = ServiceConfig.get_instance().settings(spec_of(type(self)).name)
        self.picker = WorkerPicker(router, settings, "Processor")
        self.tokenizer: Tokenizer | None = None
        self._workers = None

    @async_on_start
    async def load(self) -> None:
        directory = await asyncio.to_thread(ensure_model, self.model)
        self.tokenizer = await asyncio.to_thread(load_tokenizer, directory)
        self._workers = await self.worker.client("generate")
        if not self.use_router:
            await self.picker.start(Worker)

    def _prompt_ids(self, request: TextRequest) -> list[int]:
        tokenizer = self.tokenizer
        assert tokenizer is not None
        if request.kind == "chat":
            try:
                return tokenizer.apply_chat_template_ids(request.messages or [])
            except ChatTemplateError as exc:
                raise InvalidRequestError(str(exc), "messages") from exc
        return tokenizer.encode(request.prompt or "")

    def _sampling(self, request: TextRequest, prompt_len: int) -> SamplingParams:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise InvalidRequestError(
                f"the prompt has {prompt_len} tokens; this model's max-model-len is "
                f"{self.max_model_len}: shorten the prompt",
                "messages" if request.kind == "chat" else "prompt",
            )
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, room)
        elif max_tokens > room:
            raise InvalidRequestError(
                f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds "
                f"max-model-len {self.max_model_len}: ask for at most {room} tokens",
                "max_tokens",
            )
        assert self.tokenizer is not None
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop_token_ids=[] if request.ignore_eos else sorted(self.tokenizer.eos_token_ids),
            ignore_eos=request.ignore_eos,
        )

    async def _pick_worker(self, prompt_ids: list[int], request_id: str) -> RouteResponse:
        request = RouteRequest(token_ids=prompt_ids, request_id=request_id)
        if self.use_router:
            return await self.router.route(request)
        assert self._workers is not None
        return self.picker.route(request, self._workers.instance_ids())

    @endpoint()
    async def generate(self, request: TextRequest) -> AsyncIterator[GenerateChunk]:
        prompt_ids = self._prompt_ids(request)
        sampling = self._sampling(request, len(prompt_ids))
        route = await self._pick_worker(prompt_ids, request.request_id)
        worker_id = route.worker_id
        engine_request = EngineRequest(request.request_id, prompt_ids, sampling)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids=prompt_ids, stop=request.stop)
        assert self._workers is not None
        outputs = self._workers.call_with_retry(engine_request, EngineOutput, instance_id=worker_id)
        produced = 0
        first = True
        try:
            async for output in outputs:
                produced += len(output.token_ids)
                text = detok.feed(output.token_ids)
                finish = output.finish_reason
                if detok.stopped:
                    finish = "stop"
                elif finish is not None:
                    text += detok.flush()
                chunk = GenerateChunk(text, finish, produced)
                if first:
                    chunk.prompt_tokens = len(prompt_ids)
                    chunk.cached_tokens = output.cached_tokens
                    chunk.worker_id = worker_id
                    chunk.overlap_blocks = route.overlap_blocks
                    first = False
                yield chunk
                if finish is not None:
                    return
        finally:
            await outputs.aclose()  # a stop string or a gone client cancels the worker's work
