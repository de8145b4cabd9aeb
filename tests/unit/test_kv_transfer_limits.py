"""The bulk path's limits, tried with raw sockets as an attacker or a broken sender would.

A decode worker's KV listener must not read (or skip) bytes it will not use, must not wait
forever for a header or for the rest of a transfer, must not take more bytes than the
reservation's KV is long (the model's layout says how many), and must not hold more
connections than its cap. Each broken transfer for a real reservation fails that
reservation's future at once, so the decode request prefills locally instead of waiting for
its deadline. The receiver runs a real mocker engine; ``kv-transfer-bytes`` makes it take
real bytes.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

import pytest

from servegrid.distributed.transport import handshake
from servegrid.engines.base import EngineRequest, SamplingParams
from servegrid.engines.mocker import KvTransferMocker, create
from servegrid.kv_transfer import KvReceiver, KvTransferHeader, KvTransferReply, send_kv
from servegrid.kv_transfer.receiver import RemotePrefillFailedError
from servegrid.kv_transfer.wire import MAX_HEADER_BYTES, encode_frame, read_frame

PROMPT = list(range(3, 103))  # 100 tokens: KV of 99 is transferred
SHORT_TIMEOUT = 0.3  # the receiver's read timeout in the tests that wait for it
LONG_TIMEOUT = 120.0  # one that no test waits for
GIB = 1 << 30


def req(rid: str) -> EngineRequest:
    return EngineRequest(rid, PROMPT, SamplingParams(max_tokens=4))


@pytest.fixture
async def engine():
    decode = create({"speedup-ratio": 1000, "kv-transfer-bytes": True})
    await decode.start()
    yield decode
    await decode.stop()


@pytest.fixture
async def receiver_for(engine: KvTransferMocker):
    made: list[KvReceiver] = []

    async def make(**limits) -> KvReceiver:
        receiver = KvReceiver(engine, "127.0.0.1", "127.0.0.1", **limits)
        await receiver.start()
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        await receiver.stop()


async def connect(
    receiver: KvReceiver, shake: bool = True
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection past the handshake (the receiver has no secret: loopback)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", receiver.port)
    if shake:
        await asyncio.wait_for(handshake.connect_stream(reader, writer, None, "the test"), 30)
    return reader, writer


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """True once the receiver has closed the connection (EOF or reset), waiting for it."""
    try:
        return await asyncio.wait_for(reader.read(1 << 16), 30) == b""
    except ConnectionResetError:
        return True


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(30):
        while not condition():  # noqa: ASYNC110 - the receiver has no event for its counters
            await asyncio.sleep(0.01)


def lying_header(transfer_id: str, first: int = 0, num: int = 99) -> KvTransferHeader:
    # Two segments of 2 GiB: what ``_skip`` used to read through before answering.
    return KvTransferHeader(transfer_id, first, num, segment_sizes=[2 * GIB, 2 * GIB])


async def test_an_unexpected_transfer_is_refused_before_any_of_its_bytes(receiver_for):
    receiver = await receiver_for(read_timeout=LONG_TIMEOUT)
    reader, writer = await connect(receiver)
    writer.write(encode_frame(lying_header("nobody-expects-this")))
    reply = await asyncio.wait_for(read_frame(reader, KvTransferReply), 30)
    assert reply is not None and not reply.ok and "is expected" in reply.error
    assert await closed_by_peer(reader)  # it did not wait for 4 GiB that will never come
    writer.close()
    assert receiver.refused == 1 and receiver.bytes_received == 0


async def test_a_header_announcing_more_than_the_reservation_holds_is_refused(engine, receiver_for):
    receiver = await receiver_for(read_timeout=LONG_TIMEOUT)
    reservation = engine.reserve_kv(req("big"))
    target, arrived = receiver.expect(reservation)
    reader, writer = await connect(receiver)
    writer.write(encode_frame(lying_header(target.transfer_id)))
    reply = await asyncio.wait_for(read_frame(reader, KvTransferReply), 30)
    allowed = engine.kv_layout().bytes_for(99)
    assert reply is not None and not reply.ok
    assert f"{4 * GIB} bytes announced" in reply.error and f"takes at most {allowed}" in reply.error
    assert await closed_by_peer(reader)
    writer.close()
    # The decode request learns at once and prefills locally.
    with pytest.raises(RemotePrefillFailedError, match="bytes announced"):
        await asyncio.wait_for(arrived, 30)
    engine.release_kv(reservation)
    assert receiver.pending == 0


@pytest.mark.parametrize(
    "header",
    [
        KvTransferHeader("x", 0, 99, segment_sizes=[-1, 10]),
        KvTransferHeader("x", 0, 99, logical_bytes=1 << 62),  # lies in the operator's stats
        KvTransferHeader("x", 5, 99),  # not the tokens reserved
    ],
    ids=["negative-size", "lying-logical-bytes", "wrong-tokens"],
)
async def test_a_header_the_reservation_does_not_allow_is_refused(engine, receiver_for, header):
    receiver = await receiver_for(read_timeout=LONG_TIMEOUT)
    reservation = engine.reserve_kv(req("odd"))
    target, arrived = receiver.expect(reservation)
    header.transfer_id = target.transfer_id
    reader, writer = await connect(receiver)
    writer.write(encode_frame(header))
    reply = await asyncio.wait_for(read_frame(reader, KvTransferReply), 30)
    assert reply is not None and not reply.ok
    writer.close()
    with pytest.raises(RemotePrefillFailedError):
        await asyncio.wait_for(arrived, 30)
    engine.release_kv(reservation)
    assert receiver.logical_bytes_received == 0


async def test_a_transfer_that_stalls_is_cut_off_and_its_request_told(engine, receiver_for):
    receiver = await receiver_for(read_timeout=SHORT_TIMEOUT)
    reservation = engine.reserve_kv(req("stall"))
    target, arrived = receiver.expect(reservation)
    size = engine.kv_layout().bytes_for(99)
    reader, writer = await connect(receiver)
    writer.write(encode_frame(KvTransferHeader(target.transfer_id, 0, 99, segment_sizes=[size])))
    ready = await asyncio.wait_for(read_frame(reader, KvTransferReply), 30)
    assert ready is not None and ready.ok
    writer.write(bytes(size // 2))  # half of it, then nothing more, ever
    with pytest.raises(RemotePrefillFailedError, match="stalled"):
        await asyncio.wait_for(arrived, 30)
    assert await closed_by_peer(reader)
    writer.close()
    assert not reservation.committed and receiver.connections_dropped == 1
    engine.release_kv(reservation)


@pytest.mark.parametrize(
    "opening",
    [b"", b"\x00\x00", struct.pack(">I", MAX_HEADER_BYTES + 1), struct.pack(">I", 100) + b"x"],
    ids=["silent", "half-a-prefix", "oversized-frame", "partial-frame"],
)
async def test_a_connection_without_a_whole_header_in_time_is_closed(receiver_for, opening):
    receiver = await receiver_for(read_timeout=SHORT_TIMEOUT)
    reader, writer = await connect(receiver)  # past the handshake, then too little
    writer.write(opening)
    assert await closed_by_peer(reader)
    writer.close()
    assert receiver.connections_dropped == 1 and receiver.connections == 0


async def test_a_connection_that_never_answers_the_handshake_is_closed(receiver_for):
    receiver = await receiver_for(read_timeout=SHORT_TIMEOUT)
    reader, writer = await connect(receiver, shake=False)
    hello = await asyncio.wait_for(reader.readexactly(handshake.HELLO.size), 30)
    assert hello.startswith(handshake.MAGIC)
    assert await closed_by_peer(reader)  # no proof came: closed at the read timeout
    writer.close()
    assert receiver.connections_dropped == 1 and receiver.connections == 0


async def test_a_header_that_is_not_msgpack_closes_the_connection(receiver_for):
    receiver = await receiver_for(read_timeout=LONG_TIMEOUT)
    reader, writer = await connect(receiver)
    writer.write(struct.pack(">I", 4) + b"\xc1\xc1\xc1\xc1")  # 0xc1: never valid msgpack
    assert await closed_by_peer(reader)
    writer.close()
    assert receiver.connections_dropped == 1


async def test_connections_over_the_cap_are_closed_as_they_arrive(receiver_for):
    receiver = await receiver_for(read_timeout=LONG_TIMEOUT, max_connections=4)
    held = [await connect(receiver) for _ in range(4)]
    await until(lambda: receiver.connections == 4)  # each is counted once its handler runs
    reader, writer = await connect(receiver, shake=False)
    assert await closed_by_peer(reader)  # no HELLO, long before the read timeout: the cap
    writer.close()
    assert receiver.connections_refused == 1 and receiver.connections == 4
    for _, held_writer in held:
        held_writer.close()
    await until(lambda: receiver.connections == 0)  # the receiver sees them go
    reader, writer = await connect(receiver)  # room again
    writer.write(encode_frame(lying_header("after-the-cap")))
    reply = await asyncio.wait_for(read_frame(reader, KvTransferReply), 30)
    assert reply is not None and "is expected" in reply.error
    writer.close()


async def test_real_bytes_move_and_commit(engine, receiver_for):
    prefill = create({"speedup-ratio": 1000, "kv-transfer-bytes": True})
    await prefill.start()
    try:
        receiver = await receiver_for()
        reservation = engine.reserve_kv(req("bytes"))
        target, arrived = receiver.expect(reservation)
        kv = await prefill.prefill_kv(req("bytes"), target.first_token, target.num_tokens)
        await send_kv(target, kv)
        await asyncio.wait_for(arrived, 30)
        assert reservation.committed
        assert receiver.bytes_received == kv.logical_bytes == engine.kv_layout().bytes_for(99)
        engine.release_kv(reservation)
    finally:
        await prefill.stop()
