"""Request-plane server: one TCP listener per process serves every endpoint it hosts.

A handler is an async callable taking the decoded request payload. If it returns an async
iterator, each item becomes a DATA frame; otherwise its return value becomes one LAST frame.
Frames written in the same event-loop iteration are coalesced into one ``write``.

What a peer can make the server hold is bounded: nothing is served before the handshake
(``handshake.py``); the handshake and every frame must complete within ``read_timeout`` once
begun, and a frame may not exceed ``MAX_FRAME_BODY``; a stream id in use, or a frame kind a
client never sends, closes the connection and cancels its streams; a connection may have at
most ``max_streams`` streams open, and a request over that is answered with an error frame
(``too_many_streams``) without running; responses wait while more than ``send_buffer_high``
bytes are unsent (reading from that peer pauses meanwhile), and a peer that takes none of them
for ``send_stall_timeout`` seconds is disconnected.
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

from servegrid.distributed import env
from servegrid.distributed.secret import require_secret_for_bind
from servegrid.distributed.transport import handshake
from servegrid.distributed.transport.codec import converter_for, to_wire
from servegrid.distributed.transport.frames import (
    CANCEL,
    DATA,
    END,
    ERROR,
    LAST,
    READ_TIMEOUT,
    REQUEST,
    CoalescingWriter,
    FrameError,
    FrameReader,
    decode_payload,
    encode_payload,
    frame,
)
from servegrid.errors import ServegridError

log = logging.getLogger(__name__)

Handler = Callable[[Any], Awaitable[Any] | Any]

SEND_BUFFER_HIGH = 1024 * 1024  # unsent response bytes per connection before handlers wait
SEND_STALL_TIMEOUT = 30.0  # seconds over that without the peer reading: close it
MAX_LOGGED_PEERS = 1024  # hosts whose refused handshakes are logged (the counter counts all)


@dataclass(slots=True)
class HandlerEntry:
    handler: Handler
    convert: Callable[[Any], Any] | None  # decoded builtins → the handler's request type
    streaming: bool


class _ServerConnection(CoalescingWriter, asyncio.Protocol):
    __slots__ = (
        "_drain_waiters",
        "_flush_scheduled",
        "_handshake",
        "_high_water",
        "_limit",
        "_loop",
        "_out",
        "_out_bytes",
        "_partial_since",
        "_paused",
        "_peer",
        "_raw",
        "_reader",
        "_server",
        "_server_nonce",
        "_stall_timer",
        "_tasks",
        "_transport",
    )

    def __init__(self, server: RequestPlaneServer) -> None:
        self._server = server
        self._reader = FrameReader()
        self._tasks: dict[int, asyncio.Task] = {}
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self._paused = False
        self._drain_waiters: list[asyncio.Future] = []
        self._loop = asyncio.get_running_loop()
        # Frames are served only once the handshake is done: until then _transport is None
        # (nothing is written to it) and the raw transport speaks the handshake.
        self._transport: asyncio.Transport | None = None
        self._raw: asyncio.Transport | None = None
        self._handshake: bytearray | None = bytearray()
        self._server_nonce = handshake.new_nonce()
        self._high_water = server.send_buffer_high
        # Unsent bytes at which handlers wait: the high-water mark, or 0 while the transport
        # is paused, so that one comparison per frame covers both (``_out_bytes >= _limit``).
        self._limit = self._high_water
        # When the frame (or handshake) still incomplete began to arrive; 0.0 when none is.
        self._partial_since = 0.0
        self._stall_timer: asyncio.TimerHandle | None = None
        self._peer = "?"

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if peer else "?"
        # Pause writing (and with it reading) past this much unsent data; resume at a quarter.
        transport.set_write_buffer_limits(self._high_water, self._high_water // 4)  # type: ignore[attr-defined]
        self._server._connections.add(self)
        self._partial_since = self._loop.time()  # the handshake, too, must finish in time
        hello = handshake.pack_hello(self._server._secret is not None, self._server_nonce)
        transport.write(hello)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self._handshake is not None:
            data = self._handshake_received(data)
            if not data:
                return
        reader = self._reader
        try:
            frames = reader.feed(data)
        except FrameError as exc:
            self._protocol_error(str(exc))
            return
        if reader._buf:  # a frame is still incomplete
            if frames or not self._partial_since:
                self._partial_since = self._loop.time()
        elif self._partial_since:
            self._partial_since = 0.0
        tasks = self._tasks
        for kind, stream_id, body in frames:
            if kind == REQUEST:
                if stream_id in tasks:
                    self._protocol_error(f"stream id {stream_id} reused while that stream is open")
                    return
                if len(tasks) >= self._server.max_streams:
                    self._too_many_streams(stream_id)
                    continue
                tasks[stream_id] = self._loop.create_task(self._run(stream_id, body))
            elif kind == CANCEL:
                task = tasks.pop(stream_id, None)
                if task is not None:
                    task.cancel()
            else:
                self._protocol_error(f"frame kind {kind} is not one a client sends")
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        self._transport = None
        self._raw = None
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._wake_drainers()

    def pause_writing(self) -> None:
        # The peer reads slower than we answer: hold the handlers back (``_writable``), stop
        # taking new requests from it, and give up on it if it reads nothing for a while.
        self._paused = True
        self._limit = 0
        self._server.write_pauses += 1
        raw = self._raw
        if raw is not None and not raw.is_closing():
            raw.pause_reading()
        if self._stall_timer is None:
            timeout = self._server.send_stall_timeout
            self._stall_timer = self._loop.call_later(timeout, self._stalled)

    def resume_writing(self) -> None:
        self._paused = False
        self._limit = self._high_water
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        raw = self._raw
        if raw is not None and not raw.is_closing():
            raw.resume_reading()
        self._wake_drainers()

    # -- handshake -----------------------------------------------------------------------
    def _handshake_received(self, data: bytes) -> bytes:
        """Consume the client's PROOF; returns the bytes after it (frames)."""
        buf = self._handshake
        assert buf is not None
        buf += data
        size = handshake.PROOF.size
        if len(buf) < size:
            if len(buf) >= len(handshake.MAGIC) and not buf.startswith(handshake.MAGIC):
                self._protocol_error("it did not open with the servegrid handshake")
            return b""
        message, rest = bytes(buf[:size]), bytes(buf[size:])
        self._handshake = None
        try:
            status, server_proof, reason = handshake.judge(
                self._server._secret, self._server_nonce, message
            )
        except handshake.HandshakeError as exc:
            self._protocol_error(str(exc))
            return b""
        if status != handshake.ACCEPTED:
            self._refuse(status, reason)
            return b""
        raw = self._raw
        assert raw is not None
        raw.write(handshake.pack_verdict(status, server_proof))
        self._transport = raw
        self._partial_since = 0.0
        return rest

    def _refuse(self, status: int, reason: str) -> None:
        self._server._auth_failed(self._peer, reason)
        raw = self._raw
        if raw is not None:
            raw.write(handshake.pack_verdict(status))
            raw.close()  # after the verdict is written

    # -- closing on misbehaviour ----------------------------------------------------------
    def _abort(self) -> None:
        raw = self._raw
        if raw is not None:
            raw.abort()  # now: a peer that does not read would hold a graceful close forever

    def _protocol_error(self, reason: str) -> None:
        self._server.protocol_errors += 1
        log.warning("closing request-plane connection from %s: %s", self._peer, reason)
        self._abort()

    def _too_many_streams(self, stream_id: int) -> None:
        """Refuse one request, not the connection: the streams already open are the peer's
        legitimate work, and an error frame tells a buggy caller what it did."""
        server = self._server
        server.refused_streams += 1
        logged = server._stream_cap_logged
        if self._peer not in logged and len(logged) < MAX_LOGGED_PEERS:
            logged.add(self._peer)
            log.warning(
                "refused requests from %s: it has %d streams open on one connection, the cap "
                "(logged once per host; raise %s if that is legitimate)",
                self._peer,
                server.max_streams,
                env.SERVEGRID_MAX_STREAMS_PER_CONNECTION,
            )
        self._error(
            stream_id,
            "too_many_streams",
            f"this connection already has {server.max_streams} streams open, the server's cap "
            f"({env.SERVEGRID_MAX_STREAMS_PER_CONNECTION}); end or cancel streams before "
            "opening more",
        )

    def _stalled(self) -> None:
        self._stall_timer = None
        self._server.stalled_closes += 1
        log.warning(
            "closing request-plane connection from %s: it read nothing for %gs while %d bytes "
            "of responses waited",
            self._peer,
            self._server.send_stall_timeout,
            self.buffered_bytes,
        )
        self._abort()

    def _read_timed_out(self, waited: float) -> None:
        self._server.read_timeouts += 1
        what = "the handshake" if self._handshake is not None else "a frame"
        log.warning(
            "closing request-plane connection from %s: %s begun %.0fs ago is still incomplete",
            self._peer,
            what,
            waited,
        )
        self._abort()

    # -- writing -------------------------------------------------------------------------
    @property
    def buffered_bytes(self) -> int:
        """Response bytes not yet taken by the peer's socket: queued here or in the transport."""
        raw = self._raw
        return self._out_bytes + (raw.get_write_buffer_size() if raw is not None else 0)

    def _flush(self) -> bool:
        if not super()._flush():
            return False
        buffered = self._transport.get_write_buffer_size()
        server = self._server
        if buffered > server.peak_buffered_bytes:
            server.peak_buffered_bytes = buffered
        if self._drain_waiters and not self._paused:
            self._wake_drainers()  # _out_bytes is 0 now: below the limit
        return True

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _writable(self) -> None:
        """Wait until the peer has taken enough of what we sent to accept more."""
        while self._out_bytes >= self._limit and self._transport is not None:
            waiter = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    # -- one request -------------------------------------------------------------------
    def _error(self, stream_id: int, code: str, message: str) -> None:
        self._send(frame(ERROR, stream_id, encode_payload([code, message])))

    async def _run(self, stream_id: int, body: bytes) -> None:
        send = self._send
        try:
            # Each send waits while the peer is behind (``_writable``), so what one connection
            # buffers stays near ``send_buffer_high`` however many streams it carries.
            if self._out_bytes >= self._limit:
                await self._writable()
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
                        if self._out_bytes >= self._limit:
                            await self._writable()
                        send(frame(DATA, stream_id, encode_payload(to_wire(item))))
                finally:
                    await stream.aclose()
                send(frame(END, stream_id))
            else:
                result = entry.handler(request)
                if inspect.isawaitable(result):
                    result = await result
                if self._out_bytes >= self._limit:
                    await self._writable()
                send(frame(LAST, stream_id, encode_payload(to_wire(result))))
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
            # A CANCEL removed our entry already, and the id may now name a newer stream.
            tasks = self._tasks
            if tasks.get(stream_id) is asyncio.current_task():
                del tasks[stream_id]


class RequestPlaneServer:
    """Serves registered endpoint handlers on one TCP port.

    ``secret`` is the cluster secret (``distributed/secret.py``): with it every connection
    must prove it in the handshake; without it the server starts only on a loopback address.
    ``read_timeout``: seconds a peer has to finish the handshake, and each frame it begins.
    ``send_buffer_high``: bytes of unsent responses per connection past which handlers wait.
    ``send_stall_timeout``: seconds a connection may stay over that without reading any of
    it before it is closed (its streams cancelled).
    ``max_streams``: streams one connection may have open at once; a request over it is
    answered with a ``too_many_streams`` error frame (``DistributedRuntime`` passes
    ``SERVEGRID_MAX_STREAMS_PER_CONNECTION``).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        secret: str | None = None,
        read_timeout: float = READ_TIMEOUT,
        send_buffer_high: int = SEND_BUFFER_HIGH,
        send_stall_timeout: float = SEND_STALL_TIMEOUT,
        max_streams: int = env.DEFAULT_MAX_STREAMS_PER_CONNECTION,
    ) -> None:
        self.host = host
        self.port = port
        self._secret = secret.encode("ascii") if secret is not None else None
        self.read_timeout = read_timeout
        self.send_buffer_high = send_buffer_high
        self.send_stall_timeout = send_stall_timeout
        self.max_streams = max_streams
        self._handlers: dict[str, HandlerEntry] = {}
        self._connections: set[_ServerConnection] = set()
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task | None = None
        # Counters (tests and metrics read them).
        self.protocol_errors = 0
        self.auth_failures = 0
        self.read_timeouts = 0
        self.stalled_closes = 0
        self.write_pauses = 0
        self.peak_buffered_bytes = 0
        self.refused_streams = 0
        self._auth_failures_logged: set[str] = set()
        self._stream_cap_logged: set[str] = set()

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

    @property
    def buffered_bytes(self) -> int:
        """Unsent response bytes over all connections."""
        return sum(conn.buffered_bytes for conn in self._connections)

    def _auth_failed(self, peer: str, reason: str) -> None:
        self.auth_failures += 1
        # Once per peer host: a misconfigured node retries, and must not flood the log.
        logged = self._auth_failures_logged
        if peer in logged or len(logged) >= MAX_LOGGED_PEERS:
            return
        logged.add(peer)
        log.warning(
            "refused request-plane connections from %s: %s (logged once per host). Every "
            "servegrid process of the cluster needs the same %s or %s",
            peer,
            reason,
            env.SERVEGRID_CLUSTER_SECRET_FILE,
            env.SERVEGRID_CLUSTER_SECRET,
        )

    async def start(self) -> None:
        if self._server is not None:
            return
        require_secret_for_bind(self.host, self._secret is not None)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ServerConnection(self), self.host, self.port, reuse_address=True, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Close connections whose handshake or current frame has not completed in time."""
        loop = asyncio.get_running_loop()
        interval = min(1.0, self.read_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for conn in list(self._connections):
                since = conn._partial_since
                if since and now - since > self.read_timeout:
                    conn._partial_since = 0.0
                    conn._read_timed_out(now - since)

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
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            if conn._raw is not None:
                conn._raw.close()
        self._server = None
