"""Disaggregated serving (configs/disagg.yaml) against a real nats-server: where prefill runs.

The decode side (Frontend, Processor, one decode Worker) is served once for the module; prefill
workers are served separately, as a prefill node runs them (``--service-name PrefillWorker``),
so each test decides how many there are and can stop or kill them. The test reads what
happened from the services themselves: the decode Worker's ``disagg_stats`` (where each prompt
was prefilled and why, KV transfers received) and each PrefillWorker's ``status``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from servegrid.components.prefill_queue import PREFILL_QUEUE, PrefillQueueItem, encode_item
from servegrid.distributed import env
from servegrid.distributed.embedded_nats import free_port
from servegrid.distributed.runtime import DistributedRuntime
from servegrid.engines.base import EngineRequest
from servegrid.kv_transfer import KvTarget
from servegrid.llm.model_init import BUILTIN_MODEL
from tests.integration.servers import NatsServer, require_binary
from tests.support.procs import kill_quietly
from tests.support.serving import REPO, ServedGraph, serve

DISAGG = str(REPO / "configs" / "disagg.yaml")
NAMESPACE = "servegrid"  # the graph's namespace (the services' default), set explicitly below
MAX_LOCAL = 64  # max-local-prefill-length of the decode worker
QUEUE_SIZE = 2  # max-prefill-queue-size
DEADLINE_S = 12.0  # remote-prefill-timeout: then the decode worker prefills locally
ACK_WAIT_S = 2.0  # prefill-ack-wait: a dead prefill worker's item is redelivered after this
SLOW_PREFILL = "--PrefillWorker.speedup-ratio=0.02"  # ~1.6 s for 1,000 tokens: time to kill it


def prompt(tag: str, words: int = 400) -> str:
    """A prompt of about ``words`` tokens whose first block is unique to ``tag``."""
    return f"{tag} {tag} {tag} " + "the quick brown fox jumps over a lazy dog " * (words // 9)


@pytest.fixture(scope="module")
def cluster_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    binary = require_binary("nats-server", Path(os.sys.executable).parent / "nats-server")
    nats = NatsServer(binary, tmp_path_factory.mktemp("nats") / "store")
    nats.start()
    try:
        yield {
            env.NATS_SERVER: nats.url,
            env.SERVEGRID_DISCOVERY_DIR: str(tmp_path_factory.mktemp("discovery")),
            env.SERVEGRID_NAMESPACE: NAMESPACE,
        }
    finally:
        nats.stop()


@pytest.fixture(scope="module")
def decode_url(cluster_env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    args = [
        "-f",
        DISAGG,
        "--service-name",
        "Frontend,Processor,Worker",
        f"--Frontend.port={port}",
        "--Frontend.host=127.0.0.1",
        "--Worker.speedup-ratio=10",
        f"--Worker.max-local-prefill-length={MAX_LOCAL}",
        f"--Worker.max-prefill-queue-size={QUEUE_SIZE}",
        f"--Worker.remote-prefill-timeout={DEADLINE_S}",
    ]
    with serve(args, env=cluster_env) as served:
        served.wait_for_output("Frontend ready", timeout=90)
        served.wait_for_output("Worker ready", timeout=90)
        yield f"http://127.0.0.1:{port}"


@contextmanager
def prefill_workers(
    cluster_env: dict[str, str], count: int = 1, *extra: str
) -> Iterator[ServedGraph]:
    args = [
        "-f",
        DISAGG,
        "--service-name",
        "PrefillWorker",
        f"--PrefillWorker.ServiceArgs.workers={count}",
        f"--PrefillWorker.prefill-ack-wait={ACK_WAIT_S}",
        "--PrefillWorker.speedup-ratio=10",
        *extra,
    ]
    with serve(args, env=cluster_env) as served:
        served.wait_for_output("PrefillWorker ready", count=count, timeout=90)
        yield served


@pytest.fixture
async def runtime(
    cluster_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[DistributedRuntime]:
    for key, value in cluster_env.items():
        monkeypatch.setenv(key, value)
    rt = await DistributedRuntime.from_env()
    try:
        yield rt
    finally:
        await rt.shutdown(drain_timeout=0)


async def complete(url: str, text: str, max_tokens: int = 8, **extra) -> dict:
    async with httpx.AsyncClient(timeout=60) as client:
        reply = await client.post(
            f"{url}/v1/completions",
            json={"model": BUILTIN_MODEL, "prompt": text, "max_tokens": max_tokens, **extra},
        )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["usage"]["completion_tokens"] == max_tokens, body  # the full answer
    return body


async def decode_stats(runtime: DistributedRuntime) -> dict:
    client = await runtime.client(NAMESPACE, "Worker", "disagg_stats")
    await client.wait_for_instances(1, timeout=30)
    return await (await client.round_robin(None)).single()


async def prefill_statuses(runtime: DistributedRuntime, count: int) -> list[dict]:
    client = await runtime.client(NAMESPACE, "PrefillWorker", "status")
    ids = await client.wait_for_instances(count, timeout=30)
    return [await (await client.direct(None, i)).single() for i in ids]


async def decisions(runtime: DistributedRuntime) -> dict[str, int]:
    return (await decode_stats(runtime))["decisions"]


def grew(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


async def wait_for_prefill_workers(runtime: DistributedRuntime, count: int) -> None:
    """Until the decode worker's discovery shows ``count`` prefill workers (it watches too)."""
    client = await runtime.client(NAMESPACE, "PrefillWorker", "status")
    deadline = time.monotonic() + 30
    while len(client.instance_ids()) != count:
        assert time.monotonic() < deadline, f"{len(client.instance_ids())} prefill workers"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # the decode worker's watch sees the same change


async def test_no_prefill_worker_means_local_prefill(decode_url, runtime):
    await wait_for_prefill_workers(runtime, 0)
    before = await decisions(runtime)
    await complete(decode_url, prompt("nobody"))
    assert grew(before, await decisions(runtime)) == {"local_no_prefill_worker": 1}


class TestWithOnePrefillWorker:
    @pytest.fixture(scope="class")
    @classmethod
    def prefill(cls, cluster_env, decode_url) -> Iterator[ServedGraph]:
        with prefill_workers(cluster_env, 1) as served:
            yield served

    async def test_long_prompt_goes_through_the_queue_and_decode_continues_from_its_blocks(
        self, prefill, decode_url, runtime
    ):
        await wait_for_prefill_workers(runtime, 1)
        before = await decode_stats(runtime)
        reply = await complete(decode_url, prompt("queued"))
        after = await decode_stats(runtime)
        assert grew(before["decisions"], after["decisions"]) == {"remote": 1}
        assert after["transfers_received"] == before["transfers_received"] + 1
        # The KV of every prompt token but the last moved (tiny-chat: 512 bytes a token).
        moved = after["logical_bytes_received"] - before["logical_bytes_received"]
        assert moved == (reply["usage"]["prompt_tokens"] - 1) * 512
        [status] = await prefill_statuses(runtime, 1)
        handled = {h["request_id"]: h for h in status["handled"]}
        assert handled[reply["id"]]["outcome"] == "sent"
        assert handled[reply["id"]]["tokens"] == reply["usage"]["prompt_tokens"] - 1

    async def test_short_prompt_stays_local(self, prefill, decode_url, runtime):
        before = await decisions(runtime)
        await complete(decode_url, "a short question")
        assert grew(before, await decisions(runtime)) == {"local_short": 1}

    async def test_high_prefix_hit_stays_local(self, prefill, decode_url, runtime):
        text = prompt("repeated")
        before = await decisions(runtime)
        await complete(decode_url, text)  # remote: the decode worker caches what it received
        again = await complete(decode_url, text)
        assert grew(before, await decisions(runtime)) == {"remote": 1, "local_short": 1}
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > MAX_LOCAL

    async def test_greedy_disaggregated_output_equals_aggregated(
        self, prefill, decode_url, runtime
    ):
        text = prompt("greedy")
        before = await decisions(runtime)
        remote = await complete(decode_url, text, max_tokens=24, seed=1234, temperature=0)
        # The same request again is prefilled locally (prefix hit): the aggregated path.
        local = await complete(decode_url, text, max_tokens=24, seed=1234, temperature=0)
        assert grew(before, await decisions(runtime)) == {"remote": 1, "local_short": 1}
        assert remote["choices"][0]["text"] == local["choices"][0]["text"]

    async def test_full_queue_keeps_prefill_local(self, prefill, decode_url, runtime):
        [status] = await prefill_statuses(runtime, 1)
        pid = status["pid"]
        os.kill(pid, signal.SIGSTOP)  # the prefill worker stays registered but takes nothing
        try:
            await asyncio.sleep(1.5)  # its outstanding pull request expires
            queue = await runtime.namespace(NAMESPACE).work_queue(PREFILL_QUEUE, ack_wait=None)
            stale = KvTarget("127.0.0.1", 9, "stale", 0, 1)
            for n in range(QUEUE_SIZE):
                item = PrefillQueueItem(EngineRequest(f"filler-{n}", [1, 2]), stale, 0.0)
                await queue.enqueue(encode_item(item))
            assert await queue.depth() == QUEUE_SIZE
            before = await decisions(runtime)
            await complete(decode_url, prompt("crowded"))
            assert grew(before, await decisions(runtime)) == {"local_queue_full": 1}
        finally:
            os.kill(pid, signal.SIGCONT)
        # The fillers' deadline has passed: the prefill worker drops them.
        deadline = time.monotonic() + 20
        while True:
            [status] = await prefill_statuses(runtime, 1)
            expired = [h for h in status["handled"] if h["request_id"].startswith("filler-")]
            if len(expired) == QUEUE_SIZE or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert {h["outcome"] for h in expired} == {"expired"}


async def _kill_when_busy(runtime: DistributedRuntime, count: int) -> int:
    """SIGKILL the prefill worker that holds a request as soon as one does; its pid."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for status in await prefill_statuses(runtime, count):
            if status["in_flight"]:
                os.kill(status["pid"], signal.SIGKILL)
                return status["pid"]
        await asyncio.sleep(0.05)
    raise AssertionError("no prefill worker took the request")


async def test_prefill_worker_killed_mid_request_is_redelivered(cluster_env, decode_url, runtime):
    with prefill_workers(cluster_env, 2, SLOW_PREFILL):
        await wait_for_prefill_workers(runtime, 2)
        before = await decisions(runtime)
        request = asyncio.create_task(complete(decode_url, prompt("doomed", 1000), max_tokens=16))
        killed = await _kill_when_busy(runtime, 2)
        reply = await asyncio.wait_for(request, DEADLINE_S + 30)
        assert grew(before, await decisions(runtime)) == {"remote": 1}
        statuses = await prefill_statuses(runtime, 2)  # the survivor, and the restarted one
        handled = [h for s in statuses for h in s["handled"] if h["request_id"] == reply["id"]]
        assert [h["outcome"] for h in handled] == ["sent"]
        assert handled[0]["deliveries"] >= 2  # it came back from the queue after the kill
        assert killed not in {s["pid"] for s in statuses}


async def test_prefill_worker_killed_with_none_left_means_local_prefill_after_deadline(
    cluster_env, decode_url, runtime
):
    with prefill_workers(cluster_env, 1, SLOW_PREFILL) as served:
        await wait_for_prefill_workers(runtime, 1)
        before = await decisions(runtime)
        request = asyncio.create_task(complete(decode_url, prompt("orphan", 1000), max_tokens=16))
        deadline = time.monotonic() + 30
        while not (status := (await prefill_statuses(runtime, 1))[0])["in_flight"]:
            assert time.monotonic() < deadline, "the prefill worker never took the request"
            await asyncio.sleep(0.05)
        # The whole prefill node dies: its supervisor (no restart) and the worker, at once.
        kill_quietly(served.pid, signal.SIGKILL)
        kill_quietly(status["pid"], signal.SIGKILL)
        await asyncio.wait_for(request, DEADLINE_S + 30)
        assert grew(before, await decisions(runtime)) == {"local_deadline": 1}
