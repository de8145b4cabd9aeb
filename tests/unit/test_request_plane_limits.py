"""The request plane's per-connection stream cap, and the client held to the same rules as the
server: a raw peer on each side, speaking the documented wire format (``transport/frames.py``,
``transport/handshake.py``) to the real server or the real client on loopback.
"""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import msgspec
import pytest

from servegrid.distributed import env
from servegrid.distributed.errors import (
    ConnectionLostError,
    InstanceUnavailableError,
    RemoteError,
    SetupError,
)
from servegrid.distributed.transport.client import ConnectionPool
from servegrid.distributed.transport.frames import MAX_FRAME_BODY
from tests.unit.test_request_plane_trust import (
    CANCEL,
    DATA,
    ERROR,
    HEADER,
    REQUEST,
    WAIT,
    RawPeer,
    Tally,
    eventually,
    started,  # noqa: F401 - the fixture
)


# -- the server's cap on open streams per connection ----------------------------------------
async def test_streams_over_the_cap_get_an_error_frame_and_the_connection_stays(started):  # noqa: F811
    tally = Tally()
    server = await started(max_streams=3)
    server.add_handler("forever", tally.forever)
    peer = await RawPeer.connect(server.port)
    assert await peer.handshake(None) == 0
    for stream_id in (1, 2, 3):
        peer.request(stream_id, "forever", None)
    await eventually(lambda: tally.started == 3, "the three streams under the cap did not start")
    for stream_id in range(4, 14):  # ten over the cap
        peer.request(stream_id, "forever", None)

    refused = {}
    for _ in range(10):
        kind, stream_id, body = await asyncio.wait_for(peer.read_frame(), WAIT)
        assert kind == ERROR
        refused[stream_id] = msgspec.msgpack.decode(body)
    assert sorted(refused) == list(range(4, 14))
    code, message = refused[4]
    assert code == "too_many_streams"
    assert "3 streams open" in message and env.SERVEGRID_MAX_STREAMS_PER_CONNECTION in message
    assert server.refused_streams == 10 and server.protocol_errors == 0
    assert tally.started == 3 and server.in_flight == 3  # none of the excess ever ran

    peer.send(CANCEL, 2)  # a slot frees: the next request runs, on the same connection
    await eventually(lambda: tally.stopped == 1, "the cancelled stream kept running")
    peer.request(20, "forever", None)
    await eventually(lambda: tally.started == 4, "a request under the cap was not served")
    assert server.refused_streams == 10
    await peer.close()
    await eventually(lambda: tally.stopped == 4, "streams kept running after the peer left")


async def test_the_runtime_client_sees_the_cap_as_a_remote_error(started):  # noqa: F811
    tally = Tally()
    server = await started(max_streams=2)
    server.add_handler("forever", tally.forever)
    pool = ConnectionPool()
    conn = await pool.get(1, "127.0.0.1", server.port)
    open_streams = [conn.call("forever", None) for _ in range(2)]
    with pytest.raises(RemoteError) as refused:
        await conn.call("forever", None).single()
    assert refused.value.code == "too_many_streams"
    assert not conn.closed and tally.started == 2
    for stream in open_streams:
        await stream.aclose()
    pool.close()


def test_the_cap_comes_from_the_environment_and_a_bad_value_names_the_variable(monkeypatch):
    name = env.SERVEGRID_MAX_STREAMS_PER_CONNECTION
    monkeypatch.delenv(name, raising=False)
    assert env.max_streams_per_connection() == env.DEFAULT_MAX_STREAMS_PER_CONNECTION
    monkeypatch.setenv(name, "64")
    assert env.max_streams_per_connection() == 64
    for bad in ("0", "-3", "many"):
        monkeypatch.setenv(name, bad)
        with pytest.raises(SetupError, match=f"{name}='{bad}' is not a positive integer"):
            env.max_streams_per_connection()


def test_the_cap_and_its_variable_are_documented():
    doc = (Path(__file__).parents[2] / "docs" / "cluster.md").read_text()
    name = env.SERVEGRID_MAX_STREAMS_PER_CONNECTION
    row = next(line for line in doc.splitlines() if name in line)
    assert str(env.DEFAULT_MAX_STREAMS_PER_CONNECTION) in row and "too_many_streams" in row


# -- the client against a server that passed the handshake and then misbehaves ---------------
class RawServer:
    """A listener that does the server's side of the handshake (no secret) and then sends
    exactly what the test gives it, once a REQUEST has arrived."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.requests = 0
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(struct.pack("!4sBB32s", b"SGRP", 1, 0, os.urandom(32)))
        await reader.readexactly(70)  # the client's PROOF
        writer.write(struct.pack("!B32s", 0, bytes(32)))  # accepted, no proof (no secret)
        length, kind, stream_id = HEADER.unpack(await reader.readexactly(HEADER.size))
        await reader.readexactly(length)
        assert kind == REQUEST
        self.requests += 1
        writer.write(self.reply.replace(b"SID!", struct.pack("!I", stream_id)))
        try:
            await reader.read()  # hold the connection until the client drops it
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


def frame_for_stream(kind: int, body: bytes = b"", length: int | None = None) -> bytes:
    """A frame header for the stream the client opened (patched in by ``RawServer``)."""
    size = len(body) if length is None else length
    return struct.pack("!IB", size, kind) + b"SID!" + body


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        pytest.param(
            frame_for_stream(DATA, length=MAX_FRAME_BODY + 1),
            f"exceeds {MAX_FRAME_BODY}",
            id="body-over-max",
        ),
        pytest.param(frame_for_stream(REQUEST, b"x"), "server never sends", id="client-kind"),
        pytest.param(frame_for_stream(DATA, b"\xc1"), "does not decode", id="not-msgpack"),
        pytest.param(
            frame_for_stream(ERROR, msgspec.msgpack.encode(["only-a-code"])),
            "does not decode",
            id="malformed-error",
        ),
    ],
)
async def test_a_server_that_breaks_the_protocol_fails_the_stream_with_why(reply, reason):
    raw = await RawServer(reply).start()
    pool = ConnectionPool()
    try:
        conn = await pool.get(1, "127.0.0.1", raw.port)
        stream = conn.call("generate", {"prompt": "hi"})
        with pytest.raises(InstanceUnavailableError, match=reason):
            await asyncio.wait_for(stream.single(), WAIT)
        assert conn.closed and raw.requests == 1
    finally:
        pool.close()
        await raw.stop()


async def test_a_frame_the_server_leaves_unfinished_is_not_waited_on_forever():
    # One whole DATA frame, then the header and part of the body of a second one.
    first = msgspec.msgpack.encode("token")
    reply = frame_for_stream(DATA, first) + frame_for_stream(DATA, length=4096) + b"y" * 100
    raw = await RawServer(reply).start()
    pool = ConnectionPool(read_timeout=0.3)
    try:
        conn = await pool.get(1, "127.0.0.1", raw.port)
        stream = conn.call("generate", {"prompt": "hi"})
        assert await asyncio.wait_for(stream.__anext__(), WAIT) == "token"
        with pytest.raises(ConnectionLostError, match="still incomplete"):
            await asyncio.wait_for(stream.__anext__(), WAIT)
        assert pool.read_timeouts == 1 and conn.closed
    finally:
        pool.close()
        await raw.stop()
