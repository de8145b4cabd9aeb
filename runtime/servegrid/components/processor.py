"""Processor: chat template and tokenization in, incremental detokenization out.

It asks the Router for a worker when the graph links one (``...link(Router).link(Worker)``),
else picks a worker itself (``router: random | round-robin | kv``), and then streams from that
worker directly: tokens never pass through the router.

When a worker dies mid-stream, the request migrates: the Processor knows the prompt and the
tokens sent so far, so it sends prompt + generated tokens to another worker (asking for the
tokens still missing) and the client's stream goes on. A greedy or seeded request produces the
same tokens as without the failure. ``migration-limit`` (default 3) bounds the moves of one
request; past it, or with no worker left, the stream ends with a ``worker_lost`` error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import msgspec

from servegrid.components.router import Router, WorkerPicker, live_worker_ids
from servegrid.components.worker import Worker
from servegrid.distributed.errors import ConnectionLostError, NoInstancesError
from servegrid.engines.base import EngineOutput, EngineRequest, SamplingParams
from servegrid.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    NoWorkersError,
    WorkerLostError,
)
from servegrid.llm.detokenizer import IncrementalDetokenizer
from servegrid.llm.model_init import BUILTIN_MODEL, ensure_model
from servegrid.llm.protocol import GenerateChunk, RouteRequest, RouteResponse, TextRequest
from servegrid.llm.tokenizer import ChatTemplateError, Tokenizer, load_tokenizer
from servegrid.sdk import ServiceConfig, async_on_start, depends, endpoint, service
from servegrid.sdk.context import servegrid_context
from servegrid.sdk.errors import ConfigError
from servegrid.sdk.service import spec_of

log = logging.getLogger(__name__)

# Prompts longer than this (in characters) are tokenized on a thread, off the event loop.
OFF_LOOP_CHARS = 4096
# Threads tokenizing long prompts at once (each may hold a large encoding in memory).
TOKENIZE_THREADS = 2


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
        migration_limit: int = 3,
    ) -> None:
        self.model = model
        self.max_model_len = max_model_len
        self.default_max_tokens = default_max_tokens
        if not isinstance(migration_limit, int) or migration_limit < 0:
            raise ConfigError(
                f"Processor.migration-limit must be a whole number >= 0, got {migration_limit!r}"
            )
        self.migration_limit = migration_limit
        self.migrations = 0  # requests moved to another worker, since start
        # With a Router in the served graph, it decides; otherwise this picker does.
        self.use_router = servegrid_context.linked(type(self), Router)
        settings = ServiceConfig.get_instance().settings(spec_of(type(self)).name)
        self.picker = WorkerPicker(router, settings, "Processor")
        self.tokenizer: Tokenizer | None = None
        self._tokenize_pool = ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="tokenize")
        self._workers = None

    @async_on_start
    async def load(self) -> None:
        directory = await asyncio.to_thread(ensure_model, self.model)
        self.tokenizer = await asyncio.to_thread(load_tokenizer, directory)
        _ = self.tokenizer.max_token_chars  # computed once, here rather than on a request
        self._workers = await self.worker.client("generate")
        if not self.use_router:
            await self.picker.start(Worker)

    @property
    def max_prompt_chars(self) -> int:
        """No prompt that fits max-model-len has more characters than this."""
        assert self.tokenizer is not None
        return self.max_model_len * self.tokenizer.max_token_chars

    async def _prompt_ids(self, request: TextRequest) -> list[int]:
        """Token ids of the prompt; a prompt too long to fit is refused before tokenizing."""
        if request.kind == "chat":
            chars = sum(len(m.get("content") or "") for m in request.messages or [])
        else:
            chars = len(request.prompt or "")
        if chars > self.max_prompt_chars:
            raise ContextLengthExceededError(
                f"the prompt has {chars} characters; this model's max-model-len of "
                f"{self.max_model_len} tokens holds at most {self.max_prompt_chars}: "
                "shorten the prompt",
                "messages" if request.kind == "chat" else "prompt",
            )
        if chars <= OFF_LOOP_CHARS:
            return self._tokenize(request, False)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenize_pool, self._tokenize, request, True)

    def _tokenize(self, request: TextRequest, release_gil: bool) -> list[int]:
        tokenizer = self.tokenizer
        assert tokenizer is not None
        if request.kind == "chat":
            try:
                return tokenizer.apply_chat_template_ids(
                    request.messages or [], release_gil=release_gil
                )
            except ChatTemplateError as exc:
                raise InvalidRequestError(str(exc), "messages") from exc
        return tokenizer.encode(request.prompt or "", release_gil=release_gil)

    def _sampling(self, request: TextRequest, prompt_len: int) -> SamplingParams:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ContextLengthExceededError(
                f"the prompt has {prompt_len} tokens; this model's max-model-len is "
                f"{self.max_model_len}: shorten the prompt",
                "messages" if request.kind == "chat" else "prompt",
            )
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, room)
        elif max_tokens > room:
            raise ContextLengthExceededError(
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
        return self.picker.route(request, await live_worker_ids(self._workers))

    @endpoint()
    async def generate(self, request: TextRequest) -> AsyncIterator[GenerateChunk]:
        prompt_ids = await self._prompt_ids(request)
        sampling = self._sampling(request, len(prompt_ids))
        route = await self._pick_worker(prompt_ids, request.request_id)
        worker_id = route.worker_id
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids=prompt_ids, stop=request.stop)
        assert self._workers is not None
        generated: list[int] = []
        moves = 0
        first = True
        while True:
            remaining = msgspec.structs.replace(
                sampling, max_tokens=sampling.max_tokens - len(generated)
            )
            engine_request = EngineRequest(request.request_id, prompt_ids + generated, remaining)
            outputs = self._workers.call_with_retry(
                engine_request, EngineOutput, instance_id=worker_id
            )
            try:
                async for output in outputs:
                    generated.extend(output.token_ids)
                    text = detok.feed(output.token_ids)
                    finish = output.finish_reason
                    if detok.stopped:
                        finish = "stop"
                    elif finish is not None:
                        text += detok.flush()
                    chunk = GenerateChunk(text, finish, len(generated))
                    if first:
                        chunk.prompt_tokens = len(prompt_ids)
                        chunk.cached_tokens = output.cached_tokens
                        chunk.worker_id = worker_id
                        chunk.overlap_blocks = route.overlap_blocks
                        first = False
                    yield chunk
                    if finish is not None:
                        return
                return
            except ConnectionLostError as exc:
                lost = exc.instance_id
            finally:
                await outputs.aclose()  # a stop string or a gone client cancels the work
            moves += 1
            worker_id = await self._migration_target(
                request, prompt_ids + generated, lost, len(generated), moves
            )

    async def _migration_target(
        self, request: TextRequest, tokens: list[int], lost: int | None, produced: int, moves: int
    ) -> int:
        """The worker that continues a stream whose worker died; WorkerLostError if none."""
        lost_name = f"{lost:x}" if lost is not None else "?"
        if moves > self.migration_limit:
            reason = f"it already moved {self.migration_limit} time(s) (migration-limit)"
        else:
            try:
                assert self._workers is not None
                if not self._workers.instance_ids():
                    raise NoWorkersError("no worker left")
                target = (await self._pick_worker(tokens, request.request_id)).worker_id
            except (NoWorkersError, NoInstancesError) as exc:
                reason = f"no worker is left to continue it ({exc})"
            else:
                self.migrations += 1
                log.warning(
                    "request %s: worker %s lost after %d tokens; continuing on worker %x "
                    "(move %d of at most %d)",
                    request.request_id,
                    lost_name,
                    produced,
                    target,
                    moves,
                    self.migration_limit,
                )
                return target
        log.error(
            "request %s failed: worker %s lost after %d tokens and %s",
            request.request_id,
            lost_name,
            produced,
            reason,
        )
        raise WorkerLostError(
            f"the worker serving this request stopped after {produced} tokens and {reason}; "
            "retry the request"
        )
