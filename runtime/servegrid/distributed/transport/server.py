"""Request-plane server: one TCP listener per process serves every endpoint it hosts.

A handler is an async callable taking the decoded request payload. If it returns an async
iterator, each item becomes a DATA frame; otherwise its return value becomes one LAST frame.
Frames written in the same event-loop iteration are coalesced into one ``write``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from servegrid.distributed.transport.codec import converter_for, to_wire
from servegrid.distributed.transport.frames import (
    CoalescingWriter,
    FrameError,
    FrameReader,
    Kind,
    decode_payload,
    encode_payload,
    frame,
)
from servegrid.errors import ServegridError

log = logging.getLogger(__name__)

Handler = Callable[[Any], Awaitable[Any] | Any]


@dataclass(slots=True)
class HandlerEntry:
    handler: Handler
    convert: Callable[[Any], Any] | None  # decoded builtins → the handler's request type
    streaming: bool


class _ServerConnection(CoalescingWriter, asyncio.Protocol):
    __slots__ = (
        "_drain_waiters",
        "_flush_scheduled",
        "_loop",
        "_out",
        "_paused",
        "_reader",
        "_server",
        "_tasks",
        "_transport",
    )

    def __init__(self, server: RequestPlaneServer) -> None:
        self._server = server
        self._reader = FrameReader()
        self._tasks: dict[int, asyncio.Task] = {}
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._paused = False
        self._drain_waiters: list[asyncio.Future] = []
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._server._connections.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except FrameError as exc:
            log.warning("closing request-plane connection: %s", exc)
            self._transport.close()  # type: ignore[union-attr]
            return
        for kind, stream_id, body in frames:
            if kind == Kind.REQUEST:
                task = self._loop.create_task(self._run(stream_id, body))
                self._tasks[stream_id] = task
            elif kind == Kind.CANCEL:
                task = self._tasks.pop(stream_id, None)
                if task is not None:
                    task.cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        self._wake_drainers()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drainers()

    # -- writing -------------------------------------------------------------------------
    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _drain(self) -> None:
        if self._paused and self._transport is not None and not self._transport.is_closing():
            waiter = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    # -- one request -------------------------------------------------------------------
    def _error(self, stream_id: int, code: str, message: str) -> None:
        self._send(frame(Kind.ERROR, stream_id, encode_payload([code, message])))

    async def _run(self, stream_id: int, body: bytes) -> None:
        send = self._send
        try:
            try:
                endpoint_name, payload = decode_payload(body)
                entry = self._server._handlers.get(endpoint_name)
                if entry is None:
                    known = ", ".join(sorted(self._server._handlers)) or "none"
                    message = f"no endpoint {endpoint_name!r} here (serving: {known})"
                    self._error(stream_id, "endpoint_not_found", message)
                    return
                request = entry.convert(payload) if entry.convert is not None else payload
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as exc:
                # the request itself is malformed: the handler never ran
                self._error(stream_id, "invalid_request", str(exc))
                return
            if entry.streaming:
                stream = entry.handler(request)
                try:
                    async for item in stream:
                        send(frame(Kind.DATA, stream_id, encode_payload(to_wire(item))))
                        if self._paused:
                            await self._drain()
                finally:
                    await stream.aclose()
                send(frame(Kind.END, stream_id))
            else:
                result = entry.handler(request)
                if inspect.isawaitable(result):
                    result = await result
                send(frame(Kind.LAST, stream_id, encode_payload(to_wire(result))))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The caller maps the code back to a domain error (servegrid/errors.py): an
            # explicit ``code`` attribute, else the exception's class name.
            code = getattr(exc, "code", None) or type(exc).__name__
            if not isinstance(exc, ValueError | ServegridError):  # expected, not faults
                log.exception("handler for stream %d failed", stream_id)
            self._error(stream_id, str(code), str(exc))
        finally:
            self._tasks.pop(stream_id, None)


class RequestPlaneServer:
    """Serves registered endpoint handlers on one TCP port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._handlers: dict[str, HandlerEntry] = {}
        self._connections: set[_ServerConnection] = set()
        self._server: asyncio.base_events.Server | None = None

    def add_handler(
        self,
        endpoint: str,
        handler: Handler,
        *,
        request_type: Any = None,
        streaming: bool | None = None,
    ) -> None:
        if streaming is None:
            streaming = inspect.isasyncgenfunction(handler)
        self._handlers[endpoint] = HandlerEntry(handler, converter_for(request_type), streaming)

    def remove_handler(self, endpoint: str) -> None:
        self._handlers.pop(endpoint, None)

    @property
    def in_flight(self) -> int:
        return sum(len(conn._tasks) for conn in self._connections)

    async def start(self) -> None:
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ServerConnection(self), self.host, self.port, reuse_address=True, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def drain(self, timeout: float) -> None:
        """Stop accepting connections and wait (bounded) for in-flight requests to finish."""
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            tasks = [t for conn in self._connections for t in conn._tasks.values()]
            remaining = deadline - loop.time()
            if not tasks or remaining <= 0:
                return
            await asyncio.wait(tasks, timeout=remaining)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            if conn._transport is not None:
                conn._transport.close()
        self._server = None
