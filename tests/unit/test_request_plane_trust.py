"""The request plane against peers that misbehave: raw sockets speaking the documented wire
format (``transport/handshake.py``, ``transport/frames.py``) to a real server on loopback.

The raw client here is written from the format's description, not with the runtime's own
encoder, so these tests also check that the description is right.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import socket
import struct

import msgspec
import pytest

from servegrid.distributed import env
from servegrid.distributed.errors import AuthenticationError, ClusterSecretError, RemoteError
from servegrid.distributed.transport.client import ConnectionPool
from servegrid.distributed.transport.frames import MAX_FRAME_BODY, FrameTooLargeError
from servegrid.distributed.transport.server import RequestPlaneServer

SECRET = "test-cluster-secret-0123456789"
OTHER_SECRET = "another-cluster-secret-98765"
HEADER = struct.Struct("!IBI")
REQUEST, DATA, LAST, END, ERROR, CANCEL = 1, 2, 3, 4, 5, 6
WAIT = 20.0  # generous bound on waiting for an event; never a performance threshold


# -- a raw client ---------------------------------------------------------------------------
class RawPeer:
    """A TCP peer that sends exactly the bytes a test gives it and reads only when told."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, *, small_receive_buffer: bool = False) -> RawPeer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if small_receive_buffer:
            # A fixed small buffer (no autotuning): a peer that stops reading is felt at once.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
        return cls(reader, writer)

    async def handshake(self, secret: str | None) -> int:
        """Do the documented handshake; returns the server's verdict status."""
        magic, version, auth, server_nonce = struct.unpack(
            "!4sBB32s", await self.reader.readexactly(38)
        )
        assert (magic, version) == (b"SGRP", 1)
        assert auth == (1 if secret else 0) or secret is None
        client_nonce = os.urandom(32)
        if secret is None:
            proof = bytes(32)
        else:
            label = b"servegrid-request-plane-v1 client"
            message = label + server_nonce + client_nonce
            proof = hmac.new(secret.encode(), message, hashlib.sha256).digest()
        self.writer.write(
            struct.pack("!4sBB32s32s", b"SGRP", 1, 1 if secret else 0, client_nonce, proof)
        )
        status, server_proof = struct.unpack("!B32s", await self.reader.readexactly(33))
        if status == 0 and secret is not None:
            label = b"servegrid-request-plane-v1 server"
            expected = hmac.new(
                secret.encode(), label + server_nonce + client_nonce, hashlib.sha256
            ).digest()
            assert server_proof == expected
        return status

    def send(self, kind: int, stream_id: int, body: bytes = b"") -> None:
        self.writer.write(HEADER.pack(len(body), kind, stream_id) + body)

    def request(self, stream_id: int, endpoint: str, payload: object) -> None:
        self.send(REQUEST, stream_id, msgspec.msgpack.encode([endpoint, payload]))

    async def read_frame(self) -> tuple[int, int, bytes]:
        length, kind, stream_id = HEADER.unpack(await self.reader.readexactly(HEADER.size))
        return kind, stream_id, await self.reader.readexactly(length)

    async def closed_by_server(self) -> bool:
        """Read (and drop) everything until the server closes; False if it never does."""
        try:
            async with asyncio.timeout(WAIT):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            pass
        return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


async def eventually(condition, what: str) -> None:
    """Poll ``condition`` (a counter the server keeps) until it holds; fail after WAIT."""
    try:
        async with asyncio.timeout(WAIT):
            while not condition():  # noqa: ASYNC110 - counters, not events
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(what) from None


@pytest.fixture
async def started():
    """``await started(**server_options)`` → a running server; all are stopped at the end."""
    servers: list[RequestPlaneServer] = []

    async def start(**options) -> RequestPlaneServer:
        server = RequestPlaneServer("127.0.0.1", 0, **options)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


class Tally:
    """Handlers that count how often they started and how often they were stopped."""

    def __init__(self) -> None:
        self.started = 0
        self.stopped = 0
        self.running = asyncio.Event()

    async def forever(self, _: object):
        self.started += 1
        self.running.set()
        try:
            await asyncio.Event().wait()
            yield "never"
        finally:
            self.stopped += 1


# -- stream ids -----------------------------------------------------------------------------
async def test_a_reused_stream_id_closes_the_connection_and_cancels_every_stream(started):
    tally = Tally()
    server = await started()
    server.add_handler("forever", tally.forever)
    peer = await RawPeer.connect(server.port)
    assert await peer.handshake(None) == 0
    peer.request(7, "forever", None)
    await asyncio.wait_for(tally.running.wait(), WAIT)
    for _ in range(49):
        peer.request(7, "forever", None)  # the id of a stream that is still open

    assert await peer.closed_by_server()
    await eventually(lambda: server.in_flight == 0, "streams left running")
    await eventually(lambda: tally.stopped == tally.started, "a generation kept running")
    assert tally.started == 1  # no duplicate ever ran
    assert server.protocol_errors == 1
    await peer.close()


async def test_an_id_is_free_again_once_its_stream_was_cancelled(started):
    tally = Tally()
    server = await started()
    server.add_handler("forever", tally.forever)
    peer = await RawPeer.connect(server.port)
    assert await peer.handshake(None) == 0
    peer.request(3, "forever", None)
    peer.send(CANCEL, 3)
    peer.request(3, "forever", None)  # legal: the first stream 3 is over
    await eventually(lambda: tally.started == 1 and tally.stopped == 0, "stream 3 not running")
    assert server.in_flight == 1 and server.protocol_errors == 0
    await peer.close()
    await eventually(lambda: tally.stopped == 1, "the second stream 3 kept running")


@pytest.mark.parametrize(
    "bad_frame",
    [
        pytest.param(HEADER.pack(MAX_FRAME_BODY + 1, REQUEST, 1), id="body-over-max"),
        pytest.param(HEADER.pack(0, DATA, 1), id="server-only-kind"),
    ],
)
async def test_a_frame_no_client_sends_closes_the_connection(started, bad_frame):
    server = await started()
    peer = await RawPeer.connect(server.port)
    assert await peer.handshake(None) == 0
    peer.writer.write(bad_frame)
    assert await peer.closed_by_server()
    assert server.protocol_errors == 1
    await peer.close()


async def test_an_oversized_response_fails_its_stream_not_the_connection(started):
    server = await started()

    async def sized(size: int) -> bytes:
        return b"z" * size

    server.add_handler("sized", sized)
    pool = ConnectionPool()
    conn = await pool.get(1, "127.0.0.1", server.port)
    with pytest.raises(RemoteError, match="frame limit"):
        await conn.call("sized", MAX_FRAME_BODY + 1).single()
    assert await conn.call("sized", 3).single() == b"zzz"  # the connection is still good
    with pytest.raises(FrameTooLargeError, match="a request of"):
        conn.call("sized", b"q" * (MAX_FRAME_BODY + 1))
    assert await conn.call("sized", 2).single() == b"zz"
    pool.close()


# -- deadlines ------------------------------------------------------------------------------
async def test_a_frame_left_unfinished_is_not_held_past_the_read_deadline(started):
    server = await started(read_timeout=0.3)
    peer = await RawPeer.connect(server.port)
    assert await peer.handshake(None) == 0
    peer.writer.write(HEADER.pack(8 * 1024 * 1024, REQUEST, 1) + b"x" * 1000)
    assert await peer.closed_by_server()
    assert server.read_timeouts == 1
    await peer.close()


async def test_a_handshake_left_unfinished_is_not_held_past_the_read_deadline(started):
    server = await started(read_timeout=0.3)
    peer = await RawPeer.connect(server.port)
    await peer.reader.readexactly(38)  # the server's HELLO; we never answer
    assert await peer.closed_by_server()
    assert server.read_timeouts == 1
    await peer.close()


async def test_a_busy_connection_is_not_cut_by_the_read_deadline(started):
    """Frames that keep arriving are progress, even when every read ends inside a frame."""
    server = await started(read_timeout=1.0)

    async def echo(value: int) -> int:
        return value

    server.add_handler("echo", echo)
    peer = await RawPeer.connect(server.port)
    assert await peer.handshake(None) == 0

    def framed(stream_id: int) -> bytes:
        body = msgspec.msgpack.encode(["echo", stream_id])
        return HEADER.pack(len(body), REQUEST, stream_id) + body

    # Each write ends one frame and begins the next, so a frame is always pending, for
    # longer in all than the deadline.
    rounds = 20
    peer.writer.write(framed(1)[:5])
    for stream_id in range(1, rounds + 1):
        await asyncio.sleep(0.1)
        peer.writer.write(framed(stream_id)[5:] + framed(stream_id + 1)[:5])
        kind, got_id, reply = await asyncio.wait_for(peer.read_frame(), WAIT)
        assert (kind, got_id, msgspec.msgpack.decode(reply)) == (LAST, stream_id, stream_id)
    assert server.read_timeouts == 0
    await peer.close()


# -- a peer that does not read --------------------------------------------------------------
HIGH_WATER = 256 * 1024
REPLY = 64 * 1024


async def test_a_client_that_does_not_read_pauses_the_writer_with_bounded_buffers(started):
    server = await started(send_buffer_high=HIGH_WATER, send_stall_timeout=300)
    answered = 0

    async def blob(index: int) -> bytes:
        nonlocal answered
        answered += 1
        return index.to_bytes(4, "big") * (REPLY // 4)

    server.add_handler("blob", blob)
    peer = await RawPeer.connect(server.port, small_receive_buffer=True)
    assert await peer.handshake(None) == 0
    requests = 400  # 25 MiB of replies if nothing held the writer back
    for stream_id in range(1, requests + 1):
        peer.request(stream_id, "blob", stream_id)
    await eventually(lambda: server.write_pauses >= 1, "the writer never paused")
    for _ in range(20):  # give a writer that ignores the pause time to pile up
        await asyncio.sleep(0.01)
    bound = 2 * HIGH_WATER + REPLY + 1024  # transport buffer + one coalesced write + a frame
    assert server.peak_buffered_bytes <= bound
    assert server.buffered_bytes <= bound
    assert answered < requests  # handlers wait too, not only the socket

    # Once the client reads, every reply arrives, complete and in its stream.
    seen = set()
    for _ in range(requests):
        kind, stream_id, body = await asyncio.wait_for(peer.read_frame(), WAIT)
        assert kind == LAST
        assert msgspec.msgpack.decode(body) == stream_id.to_bytes(4, "big") * (REPLY // 4)
        seen.add(stream_id)
    assert seen == set(range(1, requests + 1))
    assert server.peak_buffered_bytes <= bound
    await peer.close()


async def test_a_client_that_never_reads_is_disconnected_and_its_streams_cancelled(started):
    server = await started(send_buffer_high=HIGH_WATER, send_stall_timeout=0.3)
    tally = {"started": 0, "stopped": 0}

    async def endless(_: object):
        tally["started"] += 1
        try:
            for _ in range(100_000):  # bounded: 6 GiB if nothing stopped it
                yield b"y" * REPLY
        finally:
            tally["stopped"] += 1

    server.add_handler("endless", endless)
    peer = await RawPeer.connect(server.port, small_receive_buffer=True)
    assert await peer.handshake(None) == 0
    for stream_id in range(1, 11):
        peer.request(stream_id, "endless", None)
    await eventually(lambda: server.stalled_closes == 1, "the stalled peer was kept")
    await eventually(lambda: server.in_flight == 0, "streams kept running")
    await eventually(lambda: tally["stopped"] == tally["started"], "generations kept running")
    assert tally["started"] >= 1
    assert server.peak_buffered_bytes <= 2 * HIGH_WATER + REPLY + 1024
    await peer.close()


# -- authentication -------------------------------------------------------------------------
async def _call(pool: ConnectionPool, server: RequestPlaneServer, value: int) -> int:
    conn = await pool.get(1, "127.0.0.1", server.port)
    return await conn.call("echo", value).single()


@pytest.fixture
async def echo_server(started):
    calls: list[int] = []

    async def echo(value: int) -> int:
        calls.append(value)
        return value

    async def start(secret: str | None) -> tuple[RequestPlaneServer, list[int]]:
        server = await started(secret=secret)
        server.add_handler("echo", echo)
        return server, calls

    return start


async def test_the_right_secret_is_served(echo_server):
    server, calls = await echo_server(SECRET)
    pool = ConnectionPool(secret=SECRET)
    assert await _call(pool, server, 41) == 41
    assert calls == [41] and server.auth_failures == 0
    pool.close()


async def test_a_wrong_secret_is_refused_with_what_to_set_and_logged_once(echo_server, caplog):
    server, calls = await echo_server(SECRET)
    caplog.set_level(logging.WARNING, logger="servegrid.distributed.transport.server")
    for _ in range(3):
        pool = ConnectionPool(secret=OTHER_SECRET)
        with pytest.raises(AuthenticationError) as refused:
            await _call(pool, server, 1)
        pool.close()
    message = str(refused.value)
    assert "different secrets" in message
    assert env.SERVEGRID_CLUSTER_SECRET_FILE in message
    assert calls == []
    assert server.auth_failures == 3
    logged = [r for r in caplog.records if "refused request-plane" in r.getMessage()]
    assert len(logged) == 1 and "differs" in logged[0].getMessage()


async def test_a_client_without_the_secret_is_refused_with_what_to_set(echo_server):
    server, calls = await echo_server(SECRET)
    pool = ConnectionPool(secret=None)
    with pytest.raises(AuthenticationError) as refused:
        await _call(pool, server, 1)
    assert "requires the cluster secret and this process has none" in str(refused.value)
    assert env.SERVEGRID_CLUSTER_SECRET_FILE in str(refused.value)
    assert calls == [] and server.auth_failures == 1
    pool.close()


async def test_a_client_with_a_secret_refuses_a_server_without_one(echo_server):
    """A process that cannot prove the secret must not receive the cluster's requests."""
    server, calls = await echo_server(None)
    pool = ConnectionPool(secret=SECRET)
    with pytest.raises(AuthenticationError, match="runs without the cluster secret"):
        await _call(pool, server, 1)
    assert calls == []
    pool.close()


async def test_without_secrets_on_loopback_calls_work_as_before(echo_server):
    server, calls = await echo_server(None)
    pool = ConnectionPool()
    assert await _call(pool, server, 5) == 5
    assert calls == [5]
    pool.close()


async def test_frames_sent_without_the_handshake_are_never_served(echo_server):
    server, calls = await echo_server(SECRET)
    peer = await RawPeer.connect(server.port)
    await peer.reader.readexactly(38)
    body = msgspec.msgpack.encode(["echo", 1])
    peer.writer.write(HEADER.pack(len(body), REQUEST, 1) + body)  # a frame, not a PROOF
    assert await peer.closed_by_server()
    assert calls == [] and server.protocol_errors == 1
    await peer.close()

    peer = await RawPeer.connect(server.port)
    assert await peer.handshake(None) == 2  # no secret: refused
    peer.request(1, "echo", 1)
    assert await peer.closed_by_server()
    assert calls == []
    await peer.close()


async def test_a_server_beyond_loopback_refuses_to_start_without_a_secret():
    server = RequestPlaneServer("0.0.0.0", 0)
    with pytest.raises(ClusterSecretError) as refused:
        await server.start()
    message = str(refused.value)
    assert "0.0.0.0" in message and env.SERVEGRID_CLUSTER_SECRET_FILE in message
    assert env.SERVEGRID_BIND_HOST in message

    for host, secret in [("127.0.0.2", None), ("localhost", None), ("0.0.0.0", SECRET)]:
        server = RequestPlaneServer(host, 0, secret=secret)
        await server.start()
        await server.stop()
