"""One HTTP/1.1 connection: parse requests with httptools, answer them in order, stream bodies.

What a client may send is bounded (``HttpLimits``): the request target (414), the request
line and headers together (431; counted from httptools' callbacks and from the bytes it still
holds), the body (413), and the time to send a request's headers and body (408, enforced by
the server's sweep through ``check_timeouts``), and the time a response may stay unread
(``write-timeout-s``: then the connection is closed and its request cancelled). Whatever
httptools refuses (Content-Length with Transfer-Encoding, duplicate or bad Content-Length,
bad chunk sizes, bad header syntax) is a 400; every refusal closes the connection after the
requests parsed before it are answered, so nothing after a malformed request is ever
interpreted as a request of its own.

Requests on one connection are answered strictly in arrival order (pipelining-safe): parsed
requests wait in a queue while the one ahead is served, and reading pauses when the queue grows.
Responses are written with one ``transport.write`` each; streamed chunks written in the same
event-loop turn are coalesced into one write. When the client reads slowly the transport's
high-water mark pauses the streaming handler (``drain``). When the client goes away the running
handler task is cancelled, so whatever it awaits (the backend's generator) is closed at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import httptools

from servegrid.http.errors import (
    INTERNAL_ERROR_MESSAGE,
    HeadersTooLargeError,
    InvalidRequestError,
    OpenAIHttpError,
    RequestTimeoutError,
    RequestTooLargeError,
    TooManyConnectionsError,
    UrlTooLongError,
    error_body,
)
from servegrid.http.limits import HttpLimits

if TYPE_CHECKING:
    from servegrid.http.server import OpenAIHttpServer

log = logging.getLogger(__name__)

# Parsed requests waiting behind the one being served before we stop reading the socket.
MAX_PIPELINED = 16
# Streamed bytes held for one coalesced write before writing anyway.
COALESCE_LIMIT = 64 * 1024
# After refusing a request, how long to keep reading (and discarding) before closing.
LINGER_S = 2.0

_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_STATUS_LINES = {code: f"HTTP/1.1 {code} {text}\r\n".encode() for code, text in _REASONS.items()}

JSON = b"application/json"
SSE = b"text/event-stream"

# Where the parser is in the request being received.
IDLE, HEAD, BODY = 0, 1, 2


class _LimitExceeded(Exception):
    """Raised in a parser callback to stop parsing; the answer is in ``_parse_error``."""


class _DateCache:
    """The ``date`` header line, rebuilt at most once a second."""

    __slots__ = ("line", "second")

    def __init__(self) -> None:
        self.second = -1
        self.line = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            stamp = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
            self.line = b"date: " + stamp.encode() + b"\r\n"
        return self.line

    def seconds(self) -> int:
        """Unix time in whole seconds (the ``created`` field of responses)."""
        self.get()
        return self.second


date_cache = _DateCache()


class Request:
    """A fully received request. ``error`` set means: answer with it, then close."""

    __slots__ = ("body", "error", "http11", "keep_alive", "method", "path", "received")

    def __init__(
        self,
        method: bytes,
        path: bytes,
        body: bytes,
        keep_alive: bool,
        http11: bool,
        received: float,
        error: OpenAIHttpError | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.body = body
        self.keep_alive = keep_alive
        self.http11 = http11
        self.received = received
        self.error = error


# The application: called with each request; answers synchronously through the connection and
# returns None, or returns a coroutine that answers it (run as a task).
Handler = Callable[[Request, "HttpConnection"], Awaitable[None] | None]


class HttpConnection(asyncio.Protocol):
    def __init__(self, server: OpenAIHttpServer, handler: Handler, limits: HttpLimits) -> None:
        self._server = server
        self._handler = handler
        self._limits = limits
        self._max_body = limits.max_body_bytes
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        # Per-message parse state.
        self._phase = IDLE
        self._phase_since = time.monotonic()
        self._messages = 0  # messages begun on this connection
        self._url: list[bytes] = []
        self._url_size = 0
        self._head_size = 0  # request target + header fields seen by callbacks
        self._unparsed_head = 0  # bytes of this head fed while httptools still holds them
        self._header_count = 0
        self._host_count = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._expect_continue = False
        self._parse_error: OpenAIHttpError | None = None
        # Serving state.
        self._queue: deque[Request] = deque()
        self._current: Request | None = None
        self._task: asyncio.Task | None = None
        self._reading_paused = False
        self._stop_reading = False  # after a malformed request: answer what we have, then close
        self._stopping = False  # server shutdown: close once the current response is done
        self._closing = False  # we decided to close; nothing more is served
        self._linger = False  # on close: we refused input that may still be arriving
        # Writing state.
        self._out: list[bytes] = []
        self._out_size = 0  # bytes of streamed pieces waiting in _out
        self._flush_scheduled = False
        self._write_paused = False
        self._write_paused_since = 0.0  # monotonic time writing stalled; 0.0 while it flows
        self._drain_waiter: asyncio.Future | None = None
        self._chunked = True
        self.closed = False
        self.idle_since = time.monotonic()

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:  # tokens must not wait on Nagle's algorithm
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # not TCP (e.g. a Unix socket in tests)
                pass
        if not self._server._connection_opened(self):
            self._refuse()

    def data_received(self, data: bytes) -> None:
        if self._stop_reading:
            return
        message = self._messages if self._phase == HEAD else -1
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(None)  # we speak only HTTP/1.1; serve what was parsed, then close
        except httptools.HttpParserError as exc:
            error = self._parse_error
            if error is None:
                error = InvalidRequestError(f"Malformed HTTP request: {exc}.")
            self._reject(error)
        else:
            if self._phase == HEAD:
                # httptools holds a header field until it ends; a head that keeps arriving
                # without ending is counted here (all of ``data`` belongs to it when the same
                # message was already in its head before this read).
                if self._messages == message:
                    self._unparsed_head += len(data)
                if max(self._head_size, self._unparsed_head) > self._limits.max_header_bytes:
                    self._reject(self._headers_too_large())
        self._pump()

    def eof_received(self) -> bool | None:
        # A client that stops sending has in practice gone away (HTTP clients do not half-close
        # and wait): treat it as a disconnect, so an abandoned generation stops at once.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._closing = True
        self._queue.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client is gone: stop generating for it
        self._wake_drain()
        self._server._connection_closed(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._write_paused_since = time.monotonic()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._write_paused_since = 0.0
        self._wake_drain()

    # -- httptools callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._messages += 1
        self._phase = HEAD
        self._phase_since = time.monotonic()
        self._url = []
        self._url_size = self._head_size = self._unparsed_head = 0
        self._header_count = self._host_count = 0
        self._body = []
        self._body_size = 0
        self._expect_continue = False

    def _stop(self, error: OpenAIHttpError) -> None:
        self._parse_error = error
        raise _LimitExceeded  # httptools surfaces it as HttpParserCallbackError

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._url_size += len(url)
        self._head_size += len(url)
        if self._url_size > self._limits.max_url_bytes:
            self._stop(
                UrlTooLongError(
                    f"The request target exceeds {self._limits.max_url_bytes} bytes; "
                    "the API takes its parameters in the JSON body."
                )
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._head_size += len(name) + len(value) + 4
        self._unparsed_head = 0  # httptools handed over what it held
        limits = self._limits
        if self._header_count > limits.max_headers or self._head_size > limits.max_header_bytes:
            self._stop(self._headers_too_large())
        n = len(name)
        if n == 14 and name.lower() == b"content-length":
            try:
                too_large = int(value) > self._max_body
            except ValueError:
                return  # httptools rejects the message itself
            if too_large:
                self._stop(self._body_too_large())
        elif n == 4 and name.lower() == b"host":
            self._host_count += 1
        elif n == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
            self._expect_continue = True

    def on_headers_complete(self) -> None:
        self._phase = BODY
        self._phase_since = time.monotonic()
        if self._host_count != 1 and self._parser.get_http_version() == "1.1":
            self._stop(
                InvalidRequestError(
                    f"An HTTP/1.1 request needs exactly one Host header; this one has "
                    f"{self._host_count}."
                )
            )
        if self._expect_continue and self._current is None and not self._queue:
            self._transport.write(_STATUS_LINES[100] + b"\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._max_body:
            self._stop(self._body_too_large())
        self._body.append(body)

    def _body_too_large(self) -> OpenAIHttpError:
        return RequestTooLargeError(
            f"Request body exceeds the limit of {self._max_body} bytes; send a smaller request."
        )

    def _headers_too_large(self) -> OpenAIHttpError:
        limits = self._limits
        return HeadersTooLargeError(
            f"The request line and headers exceed {limits.max_header_bytes} bytes or "
            f"{limits.max_headers} fields; send fewer or shorter headers."
        )

    def on_message_complete(self) -> None:
        self._phase = IDLE
        parser = self._parser
        url = self._url[0] if len(self._url) == 1 else b"".join(self._url)
        q = url.find(b"?")
        body = self._body
        self._queue.append(
            Request(
                parser.get_method(),
                url if q < 0 else url[:q],
                body[0] if len(body) == 1 else b"".join(body),
                parser.should_keep_alive(),
                parser.get_http_version() == "1.1",
                time.perf_counter(),
            )
        )
        if len(self._queue) > MAX_PIPELINED and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    # -- limits ------------------------------------------------------------------------------
    def _refuse(self) -> None:
        """Over the server's connection cap: answer 503 at once and close (no linger: the point
        is to give the descriptor back now)."""
        self._reject(
            TooManyConnectionsError(
                f"The server has reached its limit of {self._server.max_connections} "
                "connections; retry shortly."
            )
        )
        self._pump()

    def check_timeouts(self, now: float) -> None:
        """Called by the server's sweep: close idle connections, time out slow requests and
        clients that stopped reading their response."""
        paused_since = self._write_paused_since
        if paused_since and now - paused_since > self._limits.write_timeout_s:
            # The client takes nothing: the stream would wait in drain() forever, holding the
            # worker's sequence. Abort (a graceful close would wait on the unread bytes too);
            # connection_lost cancels the request, which closes the backend stream.
            self._write_paused_since = 0.0
            self._server._write_timed_out(self, now - paused_since)
            self.abort()
            return
        if self._closing or self._reading_paused:
            return  # paused reading is our backpressure, not the client's slowness
        if self.busy:
            return
        limits = self._limits
        if self._phase == IDLE:
            if now - self.idle_since > limits.keepalive_timeout_s:
                self.shutdown()
            return
        # A request still arriving; counted from when it started or we became free.
        since = max(self._phase_since, self.idle_since)
        if self._phase == HEAD:
            limit, part = limits.header_timeout_s, "headers"
        else:
            limit, part = limits.body_timeout_s, "body"
        if now - since > limit:
            self._reject(
                RequestTimeoutError(
                    f"The request's {part} did not arrive within {limit:g} s; "
                    "send the whole request at once."
                )
            )
            self._pump()

    # -- serving -----------------------------------------------------------------------------
    def _reject(self, error: OpenAIHttpError | None) -> None:
        """Stop parsing; after the queued requests, answer ``error`` (if any) and close."""
        self._stop_reading = True
        self._linger = error is not None and not isinstance(error, TooManyConnectionsError)
        if error is not None:
            self._queue.append(Request(b"", b"", b"", False, True, time.perf_counter(), error))
        else:
            self._queue.append(None)  # type: ignore[arg-type]  # marker: close here

    def _pump(self) -> None:
        """Serve queued requests in order until one needs a task or the queue is empty."""
        while self._current is None and self._queue and not self._closing:
            request = self._queue.popleft()
            if request is None:
                self._close()
                return
            self._current = request
            self._chunked = request.http11
            if request.error is not None:
                self.send_error(request.error)
                self._server._count_rejected(request.error.status)
                self._finish()
                continue
            try:
                work = self._handler(request, self)
            except Exception:
                log.exception("HTTP handler failed before answering")
                work = None
                if self._current is request and not self._out:
                    self.send_error(OpenAIHttpError(INTERNAL_ERROR_MESSAGE))
            if work is None:
                self._finish()
                continue
            self._task = self._loop.create_task(work)
            self._task.add_done_callback(self._task_done)
            return
        if self._reading_paused and len(self._queue) <= MAX_PIPELINED // 2 and not self._closing:
            self._reading_paused = False
            self._transport.resume_reading()
        if self._current is None and not self._queue and not self._closing and self._stopping:
            self._close()

    def _task_done(self, task: asyncio.Task) -> None:
        self._task = None
        if task.cancelled() or self.closed:
            return
        exc = task.exception()
        if exc is not None:  # the handler answers its own errors; this is a bug in it
            log.error("HTTP handler raised", exc_info=exc)
            self._close()
            return
        self._finish()
        self._pump()

    def _finish(self) -> None:
        request = self._current
        self._current = None
        self.idle_since = time.monotonic()  # the keep-alive and request timeouts count from here
        self._flush()
        if request is not None and (not request.keep_alive or self._stopping):
            self._close()

    def _close(self) -> None:
        self._closing = True
        self._queue.clear()
        self._flush()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._linger and transport.can_write_eof():
            # We refused input the client may still be sending: closing now would answer that
            # with a reset, which can destroy our error response in the client's buffers.
            # Send FIN, discard what still arrives, close when the client does or after a while.
            transport.write_eof()
            self._loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    def shutdown(self) -> None:
        """Server stopping: close now if idle, else right after the response being written."""
        self._stopping = True
        self._stop_reading = True
        self._queue.clear()
        if self._current is None:
            self._close()

    def evict(self) -> None:
        """Closed to make room for a new connection: only ever an idle one (``idle``)."""
        self._stop_reading = True
        self._close()

    @property
    def idle(self) -> bool:
        """Between requests (or before the first): closing it loses no work."""
        return (
            self._phase == IDLE
            and self._current is None
            and not self._queue
            and not (self._closing)
        )

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    @property
    def busy(self) -> bool:
        return self._current is not None or bool(self._queue)

    # -- writing -----------------------------------------------------------------------------
    def _head(self, status: int, content_type: bytes, extra: bytes) -> bytes:
        request = self._current
        close = request is None or not request.keep_alive or self._stopping
        return b"".join(
            (
                _STATUS_LINES.get(status) or f"HTTP/1.1 {status} Status\r\n".encode(),
                date_cache.get(),
                b"server: servegrid\r\ncontent-type: ",
                content_type,
                b"\r\n",
                extra,
                b"connection: close\r\n" if close else b"",
            )
        )

    def send_response(
        self, status: int, body: bytes, content_type: bytes = JSON, extra_headers: bytes = b""
    ) -> None:
        """A complete response in one write."""
        if self.closed:
            return
        head = self._head(status, content_type, extra_headers)
        self._out.append(b"%scontent-length: %d\r\n\r\n%s" % (head, len(body), body))
        self._flush()

    def send_error(self, error: OpenAIHttpError, extra_headers: bytes = b"") -> None:
        self.send_response(error.status, error.body(), JSON, extra_headers)

    def send_error_body(self, status: int, message: str, error_type: str) -> None:
        self.send_response(status, error_body(message, error_type))

    def start_stream(self, status: int = 200, content_type: bytes = SSE) -> None:
        """Queue the head of a streamed response; it leaves with the first chunk."""
        if not self._chunked and self._current is not None:
            self._current.keep_alive = False  # HTTP/1.0: the body ends when the connection does
        extra = b"cache-control: no-cache\r\n"
        if self._chunked:
            extra += b"transfer-encoding: chunked\r\n"
        self._out.append(self._head(status, content_type, extra) + b"\r\n")

    def stream_write(self, data: bytes) -> None:
        """One piece of the streamed body; pieces of one loop turn leave in one write."""
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self._out.append(data)
        self._out_size += len(data)
        if self._out_size >= COALESCE_LIMIT:
            self._flush()  # a generator that never yields to the loop must still hit backpressure
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def end_stream(self) -> None:
        if self._chunked:
            self._out.append(b"0\r\n\r\n")
        self._flush()

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    async def drain(self) -> None:
        """Wait until the client has read enough of what we wrote (or is gone)."""
        self._flush()
        if not self._write_paused or self.closed:
            return
        if self._drain_waiter is None:
            self._drain_waiter = self._loop.create_future()
        await self._drain_waiter

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._out_size = 0
        out = self._out
        if not out:
            return
        self._out = []
        if self.closed or self._transport is None or self._transport.is_closing():
            return
        self._transport.write(out[0] if len(out) == 1 else b"".join(out))
