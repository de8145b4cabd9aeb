"""The request plane against real sockets on loopback, with the file discovery backend."""

from __future__ import annotations

import asyncio

import pytest

from servegrid.distributed.errors import NoInstancesError, RemoteError


async def test_streaming_and_unary_calls_across_runtimes(runtimes):
    server, caller = await runtimes(), await runtimes()

    async def count(n: int):
        for i in range(n):
            yield i

    async def add(pair: list[int]) -> int:
        return pair[0] + pair[1]

    comp = server.namespace("t").component("Math")
    await comp.endpoint("count").serve(count, instance_id=1)
    await comp.endpoint("add").serve(add, instance_id=1)

    count_client = await caller.namespace("t").component("Math").endpoint("count").client()
    add_client = await caller.namespace("t").component("Math").endpoint("add").client()
    assert [i async for i in await count_client.round_robin(5)] == [0, 1, 2, 3, 4]
    assert await (await add_client.round_robin([2, 3])).single() == 5
    # Many concurrent streams share one connection.
    results = await asyncio.gather(*[(await add_client.random([i, i])).single() for i in range(50)])
    assert results == [2 * i for i in range(50)]


async def test_handler_error_reaches_caller_and_server_keeps_serving(runtimes):
    server, caller = await runtimes(), await runtimes()

    async def boom(x: int) -> int:
        if x < 0:
            raise ValueError("negative input")
        return x

    await server.namespace("t").component("C").endpoint("boom").serve(boom, instance_id=7)
    client = await caller.namespace("t").component("C").endpoint("boom").client()
    with pytest.raises(RemoteError, match="negative input"):
        await (await client.round_robin(-1)).single()
    assert await (await client.round_robin(3)).single() == 3


async def test_closing_a_stream_cancels_the_work_on_the_server(runtimes):
    server, caller = await runtimes(), await runtimes()
    cancelled = asyncio.Event()

    async def forever(_: None):
        try:
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0.01)
        finally:
            cancelled.set()

    await server.namespace("t").component("C").endpoint("forever").serve(forever, instance_id=9)
    client = await caller.namespace("t").component("C").endpoint("forever").client()
    stream = await client.round_robin(None)
    async for item in stream:
        if item == 3:
            break
    await stream.aclose()
    await asyncio.wait_for(cancelled.wait(), 5)
    assert server.server.in_flight == 0


async def test_no_instances_is_a_clear_error(runtimes):
    caller = await runtimes()
    client = await caller.namespace("t").component("Nobody").endpoint("x").client()
    with pytest.raises(NoInstancesError, match="Nobody"):
        await client.round_robin(1)


async def test_a_preferred_instance_that_is_gone_falls_back_to_another(runtimes):
    alive, dying, caller = await runtimes(), await runtimes(), await runtimes()

    async def whoami(_: None):
        yield "alive"

    await alive.namespace("t").component("W").endpoint("who").serve(whoami, instance_id=1)

    async def never(_: None):
        yield "dying"

    await dying.namespace("t").component("W").endpoint("who").serve(never, instance_id=2)
    client = await caller.namespace("t").component("W").endpoint("who").client()
    await client.wait_for_instances(2, timeout=5)
    await dying.server.stop()  # instance 2 is still registered but refuses connections

    answers = [item async for item in client.call_with_retry(None, instance_id=2)]
    assert answers == ["alive"]
    assert 2 not in client.instance_ids()  # marked down at once


async def test_a_payload_that_cannot_be_encoded_leaves_no_stream_record(runtimes):
    server, caller = await runtimes(), await runtimes()

    async def echo(payload: dict) -> dict:
        return payload

    await server.namespace("t").component("E").endpoint("echo").serve(echo, instance_id=5)
    client = await caller.namespace("t").component("E").endpoint("echo").client()
    assert await (await client.round_robin({"seed": 1})).single() == {"seed": 1}
    conn = caller.pool._conns[5]
    for _ in range(3):  # msgpack has no integer above 2**64 - 1
        with pytest.raises(OverflowError):
            await client.round_robin({"seed": 2**64})
    assert conn._streams == {}
    assert not conn.closed
    assert await (await client.round_robin({"seed": 2})).single() == {"seed": 2}
