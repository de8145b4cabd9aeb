"""Request-plane client: one multiplexed TCP connection per remote process.

``Connection.call(endpoint, payload)`` returns a ``ResponseStream``: iterate it for the
responses, or ``await stream.single()`` for a one-response endpoint. Closing the stream
before it ends (``aclose``, or leaving an ``async for`` early) sends CANCEL so the server
stops the work.

A connection is usable once the handshake of ``handshake.py`` has succeeded: ``connect``
raises ``AuthenticationError`` (saying what to set) when the two processes do not share the
cluster secret.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from typing import Any

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
        try:
            frames = self._reader.feed(data)
        except FrameError as exc:
            self._transport.close()  # type: ignore[union-attr]
            self.connection_lost(exc)
            return
        streams = self._streams
        for kind, stream_id, body in frames:
            stream = streams.get(stream_id)
            if stream is None:
                continue  # cancelled by us; late frames are dropped
            if kind == DATA:
                stream._push(decode_payload(body))
                continue
            del streams[stream_id]
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
        if self.retired and not streams:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
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
                stream._fail(ConnectionLostError(f"connection to {self.host}:{self.port} lost"))
            else:
                stream._fail(InstanceUnavailableError(self.instance_id, "connection lost"))

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
    """

    def __init__(self, secret: str | None = None) -> None:
        self._conns: dict[int, Connection] = {}
        self._secret = secret.encode("ascii") if secret is not None else None

    async def get(self, instance_id: int, host: str, port: int) -> Connection:
        conn = self._conns.get(instance_id)
        if conn is None or conn.closed or (conn.host, conn.port) != (host, port):
            conn = Connection(instance_id, host, port, self._secret)
            self._conns[instance_id] = conn
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

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
