"""The OpenAI routes: validate a request, call the backend, answer as JSON or as an SSE stream.

The backend (the Frontend service) yields ``GenerateChunk``s; this module turns them into
OpenAI responses, maps the backend's exceptions to statuses, records metrics, and makes sure the
backend's generator is closed however the request ends (done, error, client gone).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Protocol

import msgspec
from pydantic import ValidationError

from servegrid.http.connection import HttpConnection, Request, date_cache
from servegrid.http.errors import (
    INTERNAL_ERROR_MESSAGE,
    InvalidRequestError,
    MethodNotAllowedError,
    OpenAIHttpError,
    RouteNotFoundError,
    error_body,
)
from servegrid.http.metrics import FrontendMetrics
from servegrid.llm.openai_protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    StreamEncoder,
    chat_completion,
    describe_validation_error,
    sse_error_event,
    text_completion,
    usage_dict,
)
from servegrid.llm.protocol import GenerateChunk, TextRequest

log = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode

CHAT_PATH = b"/v1/chat/completions"
COMPLETIONS_PATH = b"/v1/completions"
METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class OpenAIBackend(Protocol):
    """What the Frontend service provides to the HTTP layer."""

    def models(self) -> list[str]:
        """Ids of the models some registered worker serves now (LoRA adapters included)."""
        ...

    def model_parent(self, model: str) -> str | None:
        """The base model of ``model`` when it is a LoRA adapter, else None."""
        ...

    def generate(self, request: TextRequest) -> AsyncIterator[GenerateChunk]:
        """Stream the answer; raise ``servegrid.http.errors`` classes for client-visible errors."""
        ...


# An odd multiplier is a bijection modulo 2**64: distinct counters give distinct ids.
_ID_MIX = 0x9E3779B97F4A7C15  # 2**64 / the golden ratio: spreads neighbours far apart
_ID_MASK = (1 << 64) - 1


class _RequestIds:
    """Unique ids without uuid4's cost: ``cmpl-<process>-<sequence>``.

    ``<process>`` is random per process (12 hex digits); ``<sequence>`` is a counter scrambled
    by a bijection into 16 fixed-width hex digits. Consecutive ids then differ in nearly every
    digit rather than only the last one, so two requests are not confused when read in a log,
    and the fixed widths and the separator leave no doubt where each part ends.
    """

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def next(self, kind: str) -> str:
        sequence = (next(self._counter) * _ID_MIX) & _ID_MASK
        return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{self._prefix}-{sequence:016x}"


class _Tally:
    """Token counts and latency metrics of one response, fed chunk by chunk."""

    __slots__ = (
        "_last",
        "_metrics",
        "_received",
        "cached_tokens",
        "completion_tokens",
        "finish_reason",
        "prompt_tokens",
    )

    def __init__(self, metrics: FrontendMetrics, received: float) -> None:
        self._metrics = metrics
        self._received = received
        self._last: float | None = None
        self.prompt_tokens = self.cached_tokens = self.completion_tokens = 0
        self.finish_reason: str | None = None

    def add(self, chunk: GenerateChunk) -> None:
        now = time.perf_counter()
        if self._last is None:
            self._metrics.ttft.observe(now - self._received)
        else:
            new_tokens = chunk.completion_tokens - self.completion_tokens
            self._metrics.itl.observe((now - self._last) / max(1, new_tokens))
        self._last = now
        if chunk.prompt_tokens:
            self.prompt_tokens = chunk.prompt_tokens
            self.cached_tokens = chunk.cached_tokens
        self.completion_tokens = chunk.completion_tokens
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason

    def count_tokens(self) -> None:
        self._metrics.output_tokens.inc((), self.completion_tokens)
        self._metrics.input_tokens.inc((), self.prompt_tokens)


class OpenAIApp:
    """Routes requests; one instance serves every connection of an ``OpenAIHttpServer``."""

    def __init__(self, backend: OpenAIBackend, metrics: FrontendMetrics) -> None:
        self.backend = backend
        self.metrics = metrics
        self._ids = _RequestIds()
        # path -> (allowed method, handler)
        self._routes = {
            CHAT_PATH: (b"POST", self._chat),
            COMPLETIONS_PATH: (b"POST", self._completions),
            b"/v1/models": (b"GET", self._models),
            b"/health": (b"GET", self._health),
            b"/metrics": (b"GET", self._metrics),
        }

    def __call__(self, request: Request, conn: HttpConnection) -> Awaitable[None] | None:
        route = self._routes.get(request.path)
        if route is None:
            path = request.path.decode("latin-1")
            self._fail(
                conn,
                "other",
                RouteNotFoundError(
                    f"No route {request.method.decode('latin-1')} {path}. Routes: "
                    "POST /v1/chat/completions, POST /v1/completions, GET /v1/models, "
                    "GET /health, GET /metrics."
                ),
            )
            return None
        method, handler = route
        if request.method != method:
            path = request.path.decode("latin-1")
            error = MethodNotAllowedError(
                f"{path} accepts {method.decode()} only, not {request.method.decode('latin-1')}."
            )
            conn.send_error(error, b"allow: " + method + b"\r\n")
            self.metrics.requests.inc((path, "405"))
            return None
        return handler(request, conn)

    def _fail(self, conn: HttpConnection, endpoint: str, error: OpenAIHttpError) -> None:
        conn.send_error(error)
        self.metrics.requests.inc((endpoint, str(error.status)))

    # -- simple routes ---------------------------------------------------------------------------
    def _models(self, request: Request, conn: HttpConnection) -> None:
        created = date_cache.seconds()
        data = []
        for m in self.backend.models():
            card = {"id": m, "object": "model", "created": created, "owned_by": "servegrid"}
            parent = self.backend.model_parent(m)
            if parent is not None:  # a LoRA adapter names its base model, as vLLM does
                card["parent"] = parent
            data.append(card)
        conn.send_response(200, _encode({"object": "list", "data": data}))
        self.metrics.requests.inc(("/v1/models", "200"))

    def _health(self, request: Request, conn: HttpConnection) -> None:
        models = self.backend.models()
        if models:
            conn.send_response(200, _encode({"status": "ok", "models": models}))
            status = "200"
        else:
            body = {"status": "unavailable", "models": [], "reason": "no model is served yet"}
            conn.send_response(503, _encode(body))
            status = "503"
        self.metrics.requests.inc(("/health", status))

    def _metrics(self, request: Request, conn: HttpConnection) -> None:
        self.metrics.requests.inc(("/metrics", "200"))
        conn.send_response(200, self.metrics.render(), METRICS_CONTENT_TYPE)

    # -- generation ------------------------------------------------------------------------------
    def _chat(self, request: Request, conn: HttpConnection) -> Awaitable[None] | None:
        return self._generation(
            request, conn, ChatCompletionRequest, "chat", "/v1/chat/completions"
        )

    def _completions(self, request: Request, conn: HttpConnection) -> Awaitable[None] | None:
        return self._generation(request, conn, CompletionRequest, "completion", "/v1/completions")

    def _generation(
        self,
        request: Request,
        conn: HttpConnection,
        model_cls: type[ChatCompletionRequest] | type[CompletionRequest],
        kind: str,
        endpoint: str,
    ) -> Awaitable[None] | None:
        # Validation is synchronous: a bad request is answered without creating a task.
        if not request.body:
            self._fail(conn, endpoint, InvalidRequestError("Request body is empty; send JSON."))
            return None
        try:
            parsed = model_cls.model_validate_json(request.body)
        except ValidationError as exc:
            message, param = describe_validation_error(exc)
            self._fail(conn, endpoint, InvalidRequestError(message, param))
            return None
        return self._serve(request, conn, parsed, kind, endpoint)

    async def _serve(
        self,
        request: Request,
        conn: HttpConnection,
        parsed: ChatCompletionRequest | CompletionRequest,
        kind: str,
        endpoint: str,
    ) -> None:
        metrics = self.metrics
        metrics.inflight.value += 1
        request_id = self._ids.next(kind)
        status = 200
        stream = None
        try:
            stream = self.backend.generate(parsed.to_text_request(request_id))
            if parsed.stream:
                status = await self._stream(request, conn, parsed, kind, request_id, stream)
            else:
                status = await self._unary(request, conn, parsed, kind, request_id, stream)
        except OpenAIHttpError as exc:
            status = exc.status
            conn.send_error(exc)
        except Exception:
            log.exception("request %s failed", request_id)
            status = 500
            conn.send_response(500, error_body(INTERNAL_ERROR_MESSAGE, "internal_error"))
        finally:
            # Runs on client disconnect too (the task is cancelled): free the worker's slot.
            metrics.inflight.value -= 1
            if conn.closed:
                status = 499  # client closed the request (nginx's convention)
            metrics.requests.inc((endpoint, str(status)))
            if status == 200:
                metrics.e2e.observe(time.perf_counter() - request.received)
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    log.exception("closing the backend stream of %s failed", request_id)

    async def _unary(
        self,
        request: Request,
        conn: HttpConnection,
        parsed: ChatCompletionRequest | CompletionRequest,
        kind: str,
        request_id: str,
        stream: AsyncIterator[GenerateChunk],
    ) -> int:
        tally = _Tally(self.metrics, request.received)
        texts: list[str] = []
        async for chunk in stream:
            tally.add(chunk)
            texts.append(chunk.text)
        text = "".join(texts)
        usage = usage_dict(tally.prompt_tokens, tally.completion_tokens, tally.cached_tokens)
        created = date_cache.seconds()
        finish_reason = tally.finish_reason or "stop"
        if kind == "chat":
            body = chat_completion(request_id, parsed.model, created, text, finish_reason, usage)
        else:
            if parsed.echo:
                text = parsed.prompt + text
            body = text_completion(request_id, parsed.model, created, text, finish_reason, usage)
        conn.send_response(200, body)
        tally.count_tokens()
        return 200

    async def _stream(
        self,
        request: Request,
        conn: HttpConnection,
        parsed: ChatCompletionRequest | CompletionRequest,
        kind: str,
        request_id: str,
        stream: AsyncIterator[GenerateChunk],
    ) -> int:
        iterator = stream.__aiter__()
        # The status line waits for the first chunk, so that errors the backend raises before
        # generating (unknown model, no workers, prompt too long) get their proper status.
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            first = None
        encoder = StreamEncoder(
            kind, request_id, parsed.model, date_cache.seconds(), parsed.include_usage
        )
        conn.start_stream()
        echo = kind == "completion" and parsed.echo
        tally = _Tally(self.metrics, request.received)
        chunk = first
        try:
            while chunk is not None:
                tally.add(chunk)
                text = chunk.text
                if echo:
                    text = parsed.prompt + text
                    echo = False
                if text or chunk.finish_reason is not None or encoder.first:
                    conn.stream_write(encoder.event(text, chunk.finish_reason))
                if conn.write_paused:
                    await conn.drain()
                if conn.closed:
                    return 499
                try:
                    chunk = await iterator.__anext__()
                except StopAsyncIteration:
                    chunk = None
        except OpenAIHttpError as exc:
            # Headers are gone already: report in-band, as OpenAI does, then end the stream.
            conn.stream_write(sse_error_event(exc.body()))
            conn.stream_write(SSE_DONE)
            conn.end_stream()
            return exc.status
        except Exception:
            log.exception("request %s failed mid-stream", request_id)
            conn.stream_write(sse_error_event(error_body(INTERNAL_ERROR_MESSAGE, "internal_error")))
            conn.stream_write(SSE_DONE)
            conn.end_stream()
            return 500
        finally:
            tally.count_tokens()
        if tally.finish_reason is None:
            conn.stream_write(encoder.event("", "stop"))
        if parsed.include_usage:
            conn.stream_write(
                encoder.usage_event(
                    tally.prompt_tokens, tally.completion_tokens, tally.cached_tokens
                )
            )
        conn.stream_write(SSE_DONE)
        conn.end_stream()
        return 200
