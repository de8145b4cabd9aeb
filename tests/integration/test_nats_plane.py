"""The NATS event plane and JetStream work queue against a real nats-server, restarts included."""

from __future__ import annotations

import asyncio
import signal
import time

from servegrid.distributed.events import subject_for
from servegrid.distributed.nats_plane import NatsEventPlane, NatsWorkQueue, connect_nats
from tests.integration.servers import NatsServer

RECONNECT_TIMEOUT = 15.0


async def next_payload(subscription, timeout: float = 5.0) -> bytes:
    iterator = aiter(subscription)
    return await asyncio.wait_for(anext(iterator), timeout)


async def test_pubsub_resumes_after_a_server_restart(nats_server: NatsServer) -> None:
    subscriber = await connect_nats(nats_server.url)
    publisher = await connect_nats(nats_server.url)
    try:
        events_in, events_out = NatsEventPlane(subscriber), NatsEventPlane(publisher)
        subject = subject_for("it", "kv_events")
        subscription = await events_in.subscribe(subject)
        payloads = aiter(subscription)
        await events_in.flush()
        await events_out.publish(subject, b"before")
        assert await asyncio.wait_for(anext(payloads), 5) == b"before"

        nats_server.stop()
        nats_server.start()  # same port, same store: the same server
        await subscriber.wait_reconnects(1, RECONNECT_TIMEOUT)
        await publisher.wait_reconnects(1, RECONNECT_TIMEOUT)
        # The client resent its SUB on reconnect; a round trip makes sure the server has it.
        await events_in.flush()

        await events_out.publish(subject, b"after")
        assert await asyncio.wait_for(anext(payloads), 5) == b"after"
        await subscription.unsubscribe()
    finally:
        await subscriber.close()
        await publisher.close()


async def test_work_item_of_a_dead_consumer_is_redelivered_after_ack_wait(
    nats_server: NatsServer, spawn
) -> None:
    ack_wait = 1.5
    connection = await connect_nats(nats_server.url)
    try:
        queue = NatsWorkQueue(connection, "it_redeliver", ack_wait=ack_wait)
        for n in range(3):
            await queue.enqueue(f"item-{n}".encode())
        assert await queue.depth() == 3

        child = await spawn("take_one.py", nats_server.url, "it_redeliver", str(ack_wait))
        line = await child.first_line()
        taken_at = time.monotonic()
        assert line == "TOOK item-0"
        assert await queue.depth() == 2
        assert await queue.in_flight() == 1
        child.signal(signal.SIGKILL)

        seen: dict[bytes, int] = {}
        deadline = time.monotonic() + ack_wait + 5
        while len(seen) < 3 and time.monotonic() < deadline:
            item = await queue.dequeue(timeout=1.0)
            if item is None:
                continue
            seen[item.data] = item.deliveries
            if item.data == b"item-0":
                redelivered_after = time.monotonic() - taken_at
            await item.ack()
        assert seen == {b"item-0": 2, b"item-1": 1, b"item-2": 1}
        assert redelivered_after >= ack_wait - 0.2
        assert await queue.depth() == 0
        assert await queue.in_flight() == 0
        await queue.close()
    finally:
        await connection.close()


async def test_queued_items_survive_a_server_restart(nats_server: NatsServer) -> None:
    count = 20
    producer = await connect_nats(nats_server.url)
    consumer = await connect_nats(nats_server.url)
    try:
        out_queue = NatsWorkQueue(producer, "it_restart", ack_wait=5)
        in_queue = NatsWorkQueue(consumer, "it_restart", ack_wait=5)
        for n in range(count):
            await out_queue.enqueue(b"%d" % n)
        assert await in_queue.depth() == count
        # One item taken and acked before the restart is gone for good.
        first = await in_queue.dequeue(timeout=2)
        assert first is not None and first.data == b"0"
        await first.ack()

        nats_server.stop()
        nats_server.start()
        await consumer.wait_reconnects(1, RECONNECT_TIMEOUT)
        await producer.wait_reconnects(1, RECONNECT_TIMEOUT)

        assert await in_queue.depth() == count - 1
        await out_queue.enqueue(b"late")
        got: list[bytes] = []
        deadline = time.monotonic() + 15
        while len(got) < count and time.monotonic() < deadline:
            item = await in_queue.dequeue(timeout=1.0)
            if item is not None:
                got.append(item.data)
                await item.ack()
        assert sorted(got) == sorted([b"%d" % n for n in range(1, count)] + [b"late"])
        assert await in_queue.depth() == 0
    finally:
        await producer.close()
        await consumer.close()


async def test_consumers_share_the_queue_without_duplicates(nats_server: NatsServer) -> None:
    connections = [await connect_nats(nats_server.url) for _ in range(3)]
    try:
        queues = [NatsWorkQueue(c, "it_shared", ack_wait=10) for c in connections]
        for n in range(30):
            await queues[0].enqueue(b"%d" % n)
        taken: list[bytes] = []

        async def work(queue: NatsWorkQueue) -> None:
            while (item := await queue.dequeue(timeout=0.5)) is not None:
                taken.append(item.data)
                await item.ack()

        await asyncio.wait_for(asyncio.gather(*(work(q) for q in queues)), 20)
        assert sorted(taken) == sorted(b"%d" % n for n in range(30))
        assert await queues[0].depth() == 0
    finally:
        for connection in connections:
            await connection.close()


async def test_an_item_sent_again_under_its_id_is_queued_once(nats_server: NatsServer) -> None:
    """A retried enqueue (its first acknowledgement lost) must not queue the work twice."""
    connection = await connect_nats(nats_server.url)
    try:
        queue = NatsWorkQueue(connection, "it_dedupe", ack_wait=5.0)
        await queue.enqueue(b"prefill r1", item_id="transfer-1")
        await queue.enqueue(b"prefill r1", item_id="transfer-1")  # the retry
        await queue.enqueue(b"prefill r2", item_id="transfer-2")
        await queue.enqueue(b"no id")
        await queue.enqueue(b"no id")  # without an id, two items
        assert await queue.depth() == 4
        taken = []
        while (item := await queue.dequeue(timeout=1.0)) is not None:
            taken.append(item.data)
            await item.ack()
        assert taken == [b"prefill r1", b"prefill r2", b"no id", b"no id"]
    finally:
        await connection.close()
