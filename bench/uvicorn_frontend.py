"""The Frontend's ``OpenAIApp`` served by uvicorn (httptools protocol), a bare ASGI callable.

For the library-or-hand-written measurement (``graph_bench.py --http-server uvicorn``,
``http_compare.py``; figures in README.md): the routes, validation, encoding and metrics are
the same code as with the built-in ``OpenAIHttpServer``; only the HTTP/1.1 protocol is
uvicorn's. Not a product path: it has none of the built-in server's limits (header-read
timeout, request-line and header caps, body cap on the wire).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import uvicorn

from servegrid.http.connection import JSON, SSE, Request
from servegrid.http.limits import DEFAULT_LIMITS, HttpLimits
from servegrid.http.metrics import FrontendMetrics
from servegrid.http.openai_app import OpenAIApp, OpenAIBackend

_SSE_HEADERS = [(b"content-type", SSE), (b"cache-control", b"no-cache")]


class _AsgiConnection:
    """What ``OpenAIApp`` writes through (``HttpConnection``'s interface), over ASGI ``send``.

    The app writes synchronously; messages queue here and leave in ``drain``, which the app
    awaits between stream chunks (``write_paused`` is true while anything is queued).
    """

    __slots__ = ("_pending", "_send", "closed")

    def __init__(self, send: Any) -> None:
        self._send = send
        self._pending: list[dict] = []
        self.closed = False

    def send_response(
        self, status: int, body: bytes, content_type: bytes = JSON, extra_headers: bytes = b""
    ) -> None:
        headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
        for line in extra_headers.split(b"\r\n"):
            if line:
                name, value = line.split(b": ", 1)
                headers.append((name, value))
        self._pending.append({"type": "http.response.start", "status": status, "headers": headers})
        self._pending.append({"type": "http.response.body", "body": body})

    def send_error(self, error: Any, extra_headers: bytes = b"") -> None:
        self.send_response(error.status, error.body(), JSON, extra_headers)

    def start_stream(self, status: int = 200, content_type: bytes = SSE) -> None:
        self._pending.append(
            {"type": "http.response.start", "status": status, "headers": _SSE_HEADERS}
        )

    def stream_write(self, data: bytes) -> None:
        self._pending.append({"type": "http.response.body", "body": data, "more_body": True})

    def end_stream(self) -> None:
        self._pending.append({"type": "http.response.body", "body": b""})

    @property
    def write_paused(self) -> bool:
        return bool(self._pending)

    async def drain(self) -> None:
        pending, self._pending = self._pending, []
        for message in pending:
            await self._send(message)


class AsgiOpenAI:
    """A bare ASGI callable around ``OpenAIApp``."""

    def __init__(self, app: OpenAIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        request = Request(
            scope["method"].encode(),
            scope["path"].encode(),
            chunks[0] if len(chunks) == 1 else b"".join(chunks),
            True,
            True,
            time.perf_counter(),
        )
        conn = _AsgiConnection(send)
        work = self.app(request, conn)  # type: ignore[arg-type]
        if work is not None:
            await work
        await conn.drain()


class UvicornOpenAIServer:
    """``OpenAIHttpServer``'s start/stop/port, served by uvicorn."""

    def __init__(
        self,
        backend: OpenAIBackend,
        host: str = "127.0.0.1",
        port: int = 8000,
        metrics: FrontendMetrics | None = None,
        *,
        limits: HttpLimits = DEFAULT_LIMITS,
    ) -> None:
        self.metrics = metrics if metrics is not None else FrontendMetrics()
        self.app = OpenAIApp(backend, self.metrics)
        self.host = host
        self.port = port
        config = uvicorn.Config(
            AsgiOpenAI(self.app),
            host=host,
            port=port,
            http="httptools",
            lifespan="off",
            access_log=False,
            log_level="warning",
            loop="none",
            # the two limits uvicorn has; the others have no uvicorn setting
            timeout_keep_alive=int(limits.keepalive_timeout_s),
            limit_concurrency=limits.max_connections,
        )
        config.load()
        self._server = uvicorn.Server(config)
        self._server.lifespan = config.lifespan_class(config)
        self._ticker: asyncio.Task | None = None

    async def start(self) -> None:
        await self._server.startup()
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        self._ticker = asyncio.get_running_loop().create_task(self._server.main_loop())

    async def stop(self, timeout_s: float = 30.0) -> None:
        self._server.should_exit = True
        if self._ticker is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        await self._server.shutdown()
