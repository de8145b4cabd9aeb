"""NATS takes its credentials from the cluster secret: user ``servegrid``, the secret as
password, unless ``NATS_SERVER`` carries credentials of its own. Real nats-servers that
require a password, configured as the deploy role configures them."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from servegrid.distributed import env
from servegrid.distributed.embedded_nats import EmbeddedNats
from servegrid.distributed.events import subject_for
from servegrid.distributed.nats_plane import NatsEventPlane, NatsUnavailableError, connect_nats
from tests.integration.servers import NatsServer, require_binary

SECRET = "nats-cluster-secret-0123456789"


@pytest.fixture(scope="module")
def locked_nats(tmp_path_factory: pytest.TempPathFactory):
    """One password-protected server for the module (starting one costs a process)."""
    binary = require_binary("nats-server", Path(sys.executable).parent / "nats-server")
    server = NatsServer(binary, tmp_path_factory.mktemp("nats") / "store", password=SECRET)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def no_secret(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(env.SERVEGRID_CLUSTER_SECRET, raising=False)
    monkeypatch.delenv(env.SERVEGRID_CLUSTER_SECRET_FILE, raising=False)
    return monkeypatch


async def _round_trip(url: str) -> bytes:
    connection = await connect_nats(url, connect_timeout=5)
    try:
        plane = NatsEventPlane(connection)
        subject = subject_for("creds", "ping")
        subscription = await plane.subscribe(subject)
        await plane.flush()
        await plane.publish(subject, b"pong")
        return await asyncio.wait_for(anext(aiter(subscription)), 5)
    finally:
        await connection.close()


async def test_the_cluster_secret_logs_in_as_servegrid(locked_nats, no_secret):
    no_secret.setenv(env.SERVEGRID_CLUSTER_SECRET, SECRET)
    assert await _round_trip(locked_nats.url) == b"pong"


async def test_without_the_secret_the_refusal_says_what_to_set(locked_nats):
    with pytest.raises(NatsUnavailableError) as refused:
        await connect_nats(locked_nats.url, connect_timeout=5)
    assert "requires credentials" in str(refused.value)
    assert env.SERVEGRID_CLUSTER_SECRET_FILE in str(refused.value)


async def test_a_different_secret_is_refused_as_such(locked_nats, no_secret):
    no_secret.setenv(env.SERVEGRID_CLUSTER_SECRET, "not-the-cluster-secret-000")
    with pytest.raises(NatsUnavailableError, match="configured with another secret"):
        await connect_nats(locked_nats.url, connect_timeout=5)


async def test_credentials_in_the_url_win_over_the_secret(locked_nats, no_secret):
    with_password = locked_nats.url.replace("nats://", f"nats://servegrid:{SECRET}@")
    assert await _round_trip(with_password) == b"pong"

    no_secret.setenv(env.SERVEGRID_CLUSTER_SECRET, SECRET)
    wrong = locked_nats.url.replace("nats://", "nats://servegrid:wrong-password-here@")
    with pytest.raises(NatsUnavailableError) as refused:
        await connect_nats(wrong, connect_timeout=5)
    assert "refused the credentials in NATS_SERVER" in str(refused.value)
    assert "wrong-password-here" not in str(refused.value)  # never echo a password


async def test_the_private_server_of_serve_requires_the_secret_it_was_given(no_secret):
    async with EmbeddedNats(password=SECRET) as server:
        cmdline = await asyncio.to_thread(Path(f"/proc/{server.pid}/cmdline").read_bytes)
        assert SECRET.encode() not in cmdline  # other local users can read a command line
        with pytest.raises(NatsUnavailableError, match="requires credentials"):
            await connect_nats(server.url, connect_timeout=5)
        no_secret.setenv(env.SERVEGRID_CLUSTER_SECRET, SECRET)
        assert await _round_trip(server.url) == b"pong"
