"""``EndpointClient.call_with_retry``'s rules, against real request-plane servers on loopback.

- a request is sent again only while nothing of its answer arrived;
- a stream that broke after its first response is never repeated (the caller migrates it);
- at most ``max_attempts`` sends, each to an instance not tried yet;
- an instance that failed is marked down, so other requests skip it too.
"""

from __future__ import annotations

import asyncio

import pytest

from servegrid.distributed.errors import ConnectionLostError, NoInstancesError
from servegrid.distributed.runtime import DistributedRuntime

# Teardown cuts what a test left in flight (the `runtimes` fixture is in conftest.py).
RUNTIME_DRAIN_TIMEOUT = 0.0


def _cut_connections(rt: DistributedRuntime) -> None:
    """What a process death looks like to its callers: every connection drops."""
    for conn in list(rt.server._connections):
        conn._transport.close()


async def _serve(
    rt: DistributedRuntime, instance_id: int, calls: list[int], answers: int, cut: bool
) -> None:
    """An instance that records each call, yields ``answers`` items, then (if ``cut``) dies."""

    async def words(_: str):
        calls.append(instance_id)
        for i in range(answers):
            yield {"from": instance_id, "i": i}
        if cut:
            await asyncio.sleep(0)  # let the frames written so far leave first
            _cut_connections(rt)
            await asyncio.Event().wait()

    await rt.namespace("t").component("C").endpoint("words").serve(words, instance_id=instance_id)


async def _client(rt: DistributedRuntime, count: int):
    client = await rt.namespace("t").component("C").endpoint("words").client()
    await client.wait_for_instances(count, timeout=10)
    return client


async def test_a_failure_before_any_response_is_retried_elsewhere_and_marked_down(runtimes):
    calls: list[int] = []
    await _serve(await runtimes(), 1, calls, answers=0, cut=True)
    await _serve(await runtimes(), 2, calls, answers=2, cut=False)
    client = await _client(await runtimes(), 2)
    got = [item async for item in client.call_with_retry("x", instance_id=1)]
    assert got == [{"from": 2, "i": 0}, {"from": 2, "i": 1}]
    assert calls == [1, 2]
    assert client.instance_ids() == [2]  # 1 is skipped by every request for a while


async def test_a_started_stream_is_never_repeated(runtimes):
    calls: list[int] = []
    await _serve(await runtimes(), 1, calls, answers=1, cut=True)
    await _serve(await runtimes(), 2, calls, answers=2, cut=False)
    client = await _client(await runtimes(), 2)
    got = []
    with pytest.raises(ConnectionLostError) as info:
        async for item in client.call_with_retry("x", instance_id=1):
            got.append(item)
    assert got == [{"from": 1, "i": 0}]
    assert calls == [1]  # instance 2 never saw it: the caller would get the answer twice
    assert info.value.instance_id == 1
    assert client.instance_ids() == [2]


async def test_attempts_are_bounded_and_each_goes_to_a_new_instance(runtimes):
    calls: list[int] = []
    for instance_id in (1, 2, 3):
        await _serve(await runtimes(), instance_id, calls, answers=0, cut=True)
    client = await _client(await runtimes(), 3)
    with pytest.raises(NoInstancesError, match="after 2 attempt"):
        async for _ in client.call_with_retry("x", max_attempts=2):
            pass
    assert len(calls) == 2 and len(set(calls)) == 2


async def test_a_preferred_instance_that_is_not_registered_falls_back(runtimes):
    calls: list[int] = []
    await _serve(await runtimes(), 2, calls, answers=1, cut=False)
    client = await _client(await runtimes(), 1)
    got = [item async for item in client.call_with_retry("x", instance_id=99)]
    assert got == [{"from": 2, "i": 0}] and calls == [2]
