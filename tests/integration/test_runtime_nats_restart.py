"""The runtime's event plane and work queue across a NATS restart, through the API services use.

``DistributedRuntime.namespace(ns).subscribe / publish / work_queue`` against a real
nats-server that is stopped and started again on the same port and store: subscriptions and a
running queue consumer resume by themselves, and no queued item is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from servegrid.distributed.runtime import DistributedRuntime
from tests.integration.servers import NatsServer

RECONNECT_TIMEOUT = 15.0
ACK_WAIT = 2.0  # a lost ack costs this long, not the default 30 s


@pytest.fixture
async def runtimes(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[DistributedRuntime, DistributedRuntime]]:
    monkeypatch.setenv("NATS_SERVER", nats_server.url)
    monkeypatch.delenv("ETCD_ENDPOINTS", raising=False)
    monkeypatch.setenv("SERVEGRID_DISCOVERY_DIR", str(tmp_path / "discovery"))
    producer = await DistributedRuntime.from_env()
    consumer = await DistributedRuntime.from_env()
    try:
        yield producer, consumer
    finally:
        await producer.shutdown(drain_timeout=0)
        await consumer.shutdown(drain_timeout=0)


async def test_subscription_and_queue_consumer_resume_after_nats_restart(
    nats_server: NatsServer, runtimes: tuple[DistributedRuntime, DistributedRuntime]
) -> None:
    producer, consumer = runtimes
    ns_out, ns_in = producer.namespace("it"), consumer.namespace("it")

    subscription = await ns_in.subscribe("load")
    payloads = aiter(subscription)
    await (await consumer.nats_connection()).client.flush()
    await ns_out.publish("load", b"before")
    assert await asyncio.wait_for(anext(payloads), 5) == b"before"

    queue_out = await ns_out.work_queue("prefill", ack_wait=ACK_WAIT)
    queue_in = await ns_in.work_queue("prefill", ack_wait=ACK_WAIT)
    for n in range(10):
        await queue_out.enqueue(b"%d" % n)
    first = await queue_in.dequeue(timeout=2)
    assert first is not None and first.data == b"0"
    await first.ack()

    # The consumer keeps pulling through the outage, as a prefill worker's loop does.
    expected = {b"%d" % n for n in range(1, 20)}
    got: list[bytes] = []
    errors: list[BaseException] = []

    async def consume() -> None:
        deadline = time.monotonic() + 40
        while not expected <= set(got) and time.monotonic() < deadline:
            try:
                item = await queue_in.dequeue(timeout=0.5)
            except Exception as error:  # the loop must not need to handle outages itself
                errors.append(error)
                await asyncio.sleep(0.5)
                continue
            if item is not None:
                got.append(item.data)
                await item.ack()

    nats_server.stop()
    consumer_task = asyncio.create_task(consume())
    try:
        await asyncio.sleep(1.0)  # let the consumer pull against a dead server a few times
        nats_server.start()  # same port, same store: the same server
        started_at = time.monotonic()
        await (await consumer.nats_connection()).wait_reconnects(1, RECONNECT_TIMEOUT)
        await (await producer.nats_connection()).wait_reconnects(1, RECONNECT_TIMEOUT)
        reconnected_after = time.monotonic() - started_at
        for n in range(10, 20):
            await queue_out.enqueue(b"%d" % n)
        await asyncio.wait_for(consumer_task, 45)
    finally:
        consumer_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer_task

    assert set(got) == expected, f"lost: {sorted(expected - set(got))}"
    assert errors == [], f"dequeue raised during the outage: {errors!r}"
    assert await queue_in.depth() == 0

    # The client resent its SUB on reconnect; a round trip makes sure the server has it.
    await (await consumer.nats_connection()).client.flush()
    await ns_out.publish("load", b"after")
    assert await asyncio.wait_for(anext(payloads), 5) == b"after"
    await subscription.unsubscribe()
    print(f"\nNATS restart: both runtimes reconnected {reconnected_after:.2f}s after it was back")
