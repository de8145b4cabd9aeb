"""The KV transfer listener opens every connection with the request plane's handshake: a
prefill worker without the cluster secret cannot write into a decode worker's cache."""

from __future__ import annotations

import asyncio
import struct

import msgspec
import pytest

from servegrid.distributed import env
from servegrid.distributed.errors import ClusterSecretError
from servegrid.kv_transfer import KvReceiver, KvTransferRefusedError, send_kv
from servegrid.kv_transfer.wire import KvTransferHeader
from tests.unit.test_kv_transfer import engines, req  # noqa: F401 - the fixture is used

SECRET = "kv-transfer-cluster-secret-0123"


@pytest.fixture
async def secured(engines, monkeypatch):  # noqa: F811
    """A decode engine behind a receiver with the secret; a prefill engine; a reservation."""
    monkeypatch.delenv(env.SERVEGRID_CLUSTER_SECRET_FILE, raising=False)
    prefill, _ = await engines()
    decode, _ = await engines()
    receiver = KvReceiver(decode, "127.0.0.1", "127.0.0.1", secret=SECRET)
    await receiver.start()
    reservation = decode.reserve_kv(req("r1"))
    assert reservation is not None
    target, arrived = receiver.expect(reservation)
    kv = await prefill.prefill_kv(req("r1"), target.first_token, target.num_tokens)
    yield receiver, reservation, target, arrived, kv
    await receiver.stop()
    if arrived.done() and not arrived.cancelled():
        arrived.exception()  # "the worker is stopping", where the transfer was refused


async def test_a_sender_with_the_secret_delivers(secured, monkeypatch):
    receiver, reservation, target, arrived, kv = secured
    monkeypatch.setenv(env.SERVEGRID_CLUSTER_SECRET, SECRET)
    await send_kv(target, kv, bandwidth_bytes_per_s=1e12)
    await asyncio.wait_for(arrived, 5)
    assert reservation.committed and receiver.refused_connections == 0


async def test_a_sender_without_the_secret_is_refused_and_writes_nothing(secured, monkeypatch):
    receiver, reservation, target, _arrived, kv = secured
    monkeypatch.delenv(env.SERVEGRID_CLUSTER_SECRET, raising=False)
    with pytest.raises(KvTransferRefusedError, match="requires the cluster secret") as refused:
        await send_kv(target, kv, timeout=10)
    assert env.SERVEGRID_CLUSTER_SECRET_FILE in str(refused.value)
    assert not reservation.committed and receiver.transfers_received == 0
    assert receiver.refused_connections == 1


async def test_a_header_sent_without_the_handshake_is_never_read(secured):
    receiver, reservation, target, _arrived, _kv = secured
    reader, writer = await asyncio.open_connection(target.host, target.port)
    body = msgspec.msgpack.encode(KvTransferHeader(target.transfer_id, 0, 1))
    writer.write(struct.pack(">I", len(body)) + body + b"\0" * 70)
    answer = await asyncio.wait_for(reader.read(), 10)  # until the listener closes
    assert answer[:4] == b"SGRP" and len(answer) == 38  # its HELLO, then nothing
    assert not reservation.committed and receiver.transfers_received == 0
    assert receiver.refused_connections == 1
    writer.close()


async def test_a_kv_listener_beyond_loopback_needs_the_secret(engines):  # noqa: F811
    decode, _ = await engines()
    with pytest.raises(ClusterSecretError, match=env.SERVEGRID_CLUSTER_SECRET_FILE):
        await KvReceiver(decode, "0.0.0.0", "127.0.0.1").start()
