"""Request-plane client: one multiplexed TCP connection per remote process.

``Connection.call(endpoint, payload)`` returns a ``ResponseStream``: iterate it for the
responses, or ``await stream.single()`` for a one-response endpoint. Closing the stream
before it ends (``aclose``, or leaving an ``async for`` early) sends CANCEL so the server
stops the work.

A connection is usable once the handshake of ``handshake.py`` has succeeded: ``connect``
raises ``AuthenticationError`` (saying what to set) when the two processes do not share the
cluster secret.

Passing the handshake proves membership, not correctness: what the client holds for a server
is bounded as the server bounds its clients. A frame body over ``MAX_FRAME_BODY``, a frame kind
a server never sends, a body that does not decode, or a frame begun and not completed within
``read_timeout`` (checked by the pool's sweep) closes the connection, and its streams fail
with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from typing import Any

import msgspec

from servegrid.distributed.errors import (
    AuthenticationError,
    ConnectionLostError,
    EndpointNotFoundError,
    InstanceUnavailableError,
    RemoteError,
)
from servegrid.distributed.transport import handshake
from servegrid.distributed.transport.codec import converter_for
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
from servegrid.errors import from_remote

log = logging.getLogger(__name__)

_END = object()
_auth_failures_logged: set[tuple[str, int]] = set()


class ResponseStream:
    """The responses of one request, in order; an async iterator."""

    __slots__ = (
        "_conn",
        "_convert",
        "_done",
        "_error",
        "_items",
        "_waiter",
        "received_any",
        "stream_id",
    )

    def __init__(self, conn: Connection, stream_id: int, response_type: Any = None) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None
        self._done = False
        self._error: BaseException | None = None
        self.received_any = False
        self._convert = converter_for(response_type)

    # -- fed by the connection ---------------------------------------------------------
    def _push(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._push(_END)

    # -- consumer side -------------------------------------------------------------------
    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> Any:
        items = self._items
        while not items:
            if self._done:
                raise StopAsyncIteration
            self._waiter = self._conn._loop.create_future()
            await self._waiter
            self._waiter = None
        item = items.popleft()
        if item is _END:
            self._done = True
            items.clear()
            if self._error is not None:
                raise self._error
            raise StopAsyncIteration
        self.received_any = True
        convert = self._convert
        return item if convert is None else convert(item)

    async def single(self) -> Any:
        """The one response of a non-streaming endpoint."""
        result = None
        async for item in self:
            result = item
        return result

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._conn._cancel(self.stream_id)

    def __del__(self) -> None:
        if not self._done and self._conn is not None:
            try:
                self._conn._cancel(self.stream_id)
            except Exception:
                pass


class Connection(CoalescingWriter, asyncio.Protocol):
    """A client connection to one request-plane server, shared by many streams."""

    def __init__(self, instance_id: int, host: str, port: int, secret: bytes | None = None) -> None:
        self.instance_id = instance_id
        self.host = host
        self.port = port
        self._loop = asyncio.get_running_loop()
        # Set once the handshake has succeeded: only then may frames be sent.
        self._transport: asyncio.Transport | None = None
        self._raw: asyncio.Transport | None = None
        self._secret = secret
        self._handshake: bytearray | None = bytearray()
        self._server_nonce: bytes | None = None
        self._client_nonce = handshake.new_nonce()
        self._handshake_done: asyncio.Future = self._loop.create_future()
        self._reader = FrameReader()
        self._streams: dict[int, ResponseStream] = {}
        self._next_id = 1
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self._connecting: asyncio.Future | None = None
        # When the frame still incomplete began to arrive (loop time); 0.0 when none is.
        self._partial_since = 0.0
        self.closed = False
        # The instance left discovery (it is draining): close once its last stream ends.
        self.retired = False

    async def connect(self, timeout: float = 5.0) -> None:
        if self._transport is not None:
            return
        if self._connecting is None:
            self._connecting = self._loop.create_task(self._open(timeout))
        await asyncio.shield(self._connecting)

    async def _open(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._loop.create_connection(lambda: self, self.host, self.port)
                await self._handshake_done
        except AuthenticationError as exc:
            self.close()
            if (self.host, self.port) not in _auth_failures_logged:
                _auth_failures_logged.add((self.host, self.port))
                log.warning("%s", exc)
            raise
        except (OSError, TimeoutError, InstanceUnavailableError) as exc:
            self.close()
            reason = str(exc) or f"no answer within {timeout:g}s"
            raise InstanceUnavailableError(
                self.instance_id, f"{self.host}:{self.port}: {reason}"
            ) from exc

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _handshake_failed(self, error: InstanceUnavailableError) -> bytes:
        self._handshake = None
        if not self._handshake_done.done():
            self._handshake_done.set_exception(error)
        if self._raw is not None:
            self._raw.close()
        return b""

    def _refused(self, problem: str, about_secret: bool) -> bytes:
        message = f"the request-plane server at {self.host}:{self.port} {problem}"
        error_class = AuthenticationError if about_secret else InstanceUnavailableError
        return self._handshake_failed(error_class(self.instance_id, message))

    def _handshake_received(self, data: bytes) -> bytes:
        """Answer the server's HELLO, then check its VERDICT; returns the bytes after it."""
        buf = self._handshake
        assert buf is not None and self._raw is not None
        buf += data
        if self._server_nonce is None:
            if len(buf) < handshake.HELLO.size:
                return b""
            try:
                version, auth, nonce = handshake.unpack_hello(bytes(buf[: handshake.HELLO.size]))
            except handshake.HandshakeError as exc:
                return self._handshake_failed(InstanceUnavailableError(self.instance_id, str(exc)))
            del buf[: handshake.HELLO.size]
            problem = handshake.hello_problem(version, auth, self._secret is not None)
            if problem is not None:
                return self._refused(*problem)
            self._server_nonce = nonce
            self._raw.write(handshake.pack_proof(self._secret, nonce, self._client_nonce))
        if len(buf) < handshake.VERDICT.size:
            return b""
        status, proof = handshake.unpack_verdict(bytes(buf[: handshake.VERDICT.size]))
        rest = bytes(buf[handshake.VERDICT.size :])
        self._handshake = None
        problem = handshake.verdict_problem(
            status, proof, self._secret, self._server_nonce, self._client_nonce
        )
        if problem is not None:
            return self._refused(*problem)
        self._transport = self._raw
        self._handshake_done.set_result(None)
        return rest

    def data_received(self, data: bytes) -> None:
        if self._handshake is not None:
            data = self._handshake_received(data)
            if not data:
                return
        reader = self._reader
        try:
            frames = reader.feed(data)
        except FrameError as exc:
            self._broken(str(exc))
            return
        if reader._buf:  # a frame is still incomplete: the pool's sweep times it
            if frames or not self._partial_since:
                self._partial_since = self._loop.time()
        elif self._partial_since:
            self._partial_since = 0.0
        streams = self._streams
        try:
            for kind, stream_id, body in frames:
                stream = streams.get(stream_id)
                if stream is None:
                    continue  # cancelled by us; late frames are dropped
                if kind == DATA:
                    stream._push(decode_payload(body))
                    continue
                if kind == LAST:
                    stream._push(decode_payload(body))
                    stream._push(_END)
                elif kind == END:
                    stream._push(_END)
                elif kind == ERROR:
                    code, message = decode_payload(body)
                    error = (
                        EndpointNotFoundError(message)
                        if code == "endpoint_not_found"
                        else from_remote(code, message) or RemoteError(code, message)
                    )
                    stream._fail(error)
                else:
                    self._broken(f"it sent frame kind {kind}, which a server never sends")
                    return
                del streams[stream_id]
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            self._broken(f"it sent a frame body that does not decode ({exc})")
            return
        if self.retired and not streams:
            self.close()

    def _broken(self, reason: str) -> None:
        """The server broke the protocol: drop the connection, fail its streams with why."""
        log.warning(
            "closing the request-plane connection to %s:%d: %s", self.host, self.port, reason
        )
        raw = self._raw
        if raw is not None:
            raw.abort()
        self._lost(f"connection to {self.host}:{self.port} closed: {reason}")

    def _read_timed_out(self, waited: float) -> None:
        self._partial_since = 0.0
        self._broken(f"a frame begun {waited:.0f}s ago is still incomplete")

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(f"connection to {self.host}:{self.port} lost")

    def _lost(self, reason: str) -> None:
        self.closed = True
        self._transport = None
        self._raw = None
        if not self._handshake_done.done():
            self._handshake_done.set_exception(
                InstanceUnavailableError(self.instance_id, "closed during the handshake")
            )
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            if stream.received_any or stream._items:
                stream._fail(ConnectionLostError(reason))
            else:
                stream._fail(InstanceUnavailableError(self.instance_id, reason))

    # -- requests --------------------------------------------------------------------------
    def call(self, endpoint: str, payload: Any, response_type: Any = None) -> ResponseStream:
        """Send a request on an open connection and return its response stream."""
        if self.closed or self._transport is None:
            raise InstanceUnavailableError(self.instance_id, "connection closed")
        streams = self._streams
        stream_id = self._next_id
        while stream_id in streams:  # after a wrap: an id names one open stream only
            stream_id = (stream_id + 1) & 0xFFFFFFFF or 1
        # Encode before registering: a payload that cannot be encoded (or is over the frame
        # limit) raises here and must not leave a stream record behind that nobody will end.
        request = frame(REQUEST, stream_id, encode_payload((endpoint, payload)))
        self._next_id = (stream_id + 1) & 0xFFFFFFFF or 1
        stream = ResponseStream(self, stream_id, response_type)
        streams[stream_id] = stream
        self._send(request)
        return stream

    def _cancel(self, stream_id: int) -> None:
        if self._streams.pop(stream_id, None) is not None and not self.closed:
            self._send(frame(CANCEL, stream_id))
            if self.retired and not self._streams:
                self._loop.call_soon(self.close)  # after the CANCEL frame is flushed

    def retire(self) -> None:
        """No new streams will be sent here; close when the open ones have ended."""
        self.retired = True
        if not self._streams:
            self.close()

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
        self.closed = True


class ConnectionPool:
    """Connections by instance id, reopened on demand after a failure.

    ``secret``: the cluster secret each connection proves in its handshake (None: none).
    ``read_timeout``: seconds a server has to complete a frame it has begun to send; one
    sweep over the pool's connections, while it has any, enforces it (cheaper than a timer
    per frame).
    """

    def __init__(self, secret: str | None = None, read_timeout: float = READ_TIMEOUT) -> None:
        self._conns: dict[int, Connection] = {}
        # Retired connections still carry streams: the sweep watches them until they close.
        self._retired: set[Connection] = set()
        self._secret = secret.encode("ascii") if secret is not None else None
        self.read_timeout = read_timeout
        self.read_timeouts = 0  # connections closed for a frame left incomplete
        self._sweeper: asyncio.Task | None = None

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        interval = min(1.0, self.read_timeout / 4)
        while self._conns or self._retired:
            await asyncio.sleep(interval)
            now = loop.time()
            self._retired = {conn for conn in self._retired if not conn.closed}
            for conn in [*self._conns.values(), *self._retired]:
                since = conn._partial_since
                if since and now - since > self.read_timeout:
                    self.read_timeouts += 1
                    conn._read_timed_out(now - since)
        self._sweeper = None

    async def get(self, instance_id: int, host: str, port: int) -> Connection:
        conn = self._conns.get(instance_id)
        if conn is None or conn.closed or (conn.host, conn.port) != (host, port):
            conn = Connection(instance_id, host, port, self._secret)
            self._conns[instance_id] = conn
            if self._sweeper is None:
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        if conn._transport is None:
            try:
                await conn.connect()
            except InstanceUnavailableError:
                self._conns.pop(instance_id, None)
                raise
        return conn

    def drop(self, instance_id: int) -> None:
        """Close the instance's connection now (it failed): its streams fail too."""
        conn = self._conns.pop(instance_id, None)
        if conn is not None:
            conn.close()

    def retire(self, instance_id: int) -> None:
        """The instance left discovery: keep its connection until its streams end.

        A draining instance deregisters first and then finishes what it has in flight;
        closing the connection here would cut exactly the streams it is draining.
        """
        conn = self._conns.pop(instance_id, None)
        if conn is not None:
            conn.retire()
            if not conn.closed:
                self._retired.add(conn)

    def close(self) -> None:
        for conn in [*self._conns.values(), *self._retired]:
            conn.close()
        self._conns.clear()
        self._retired.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
