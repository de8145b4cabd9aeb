"""Kills and drains of a decode worker in the disaggregated graph (configs/disagg.yaml), with
streams in flight, some decoding from remotely computed KV and some still waiting for it.

Real processes under ``servegrid serve`` with a cluster secret (its private nats-server carries
the prefill queue; every request-plane and KV-transfer connection is authenticated):
two decode Workers and one slow PrefillWorker, so a long prompt's remote prefill lasts long
enough to be caught waiting. Each test starts a first wave of streams (long prompts, remotely
prefilled, and short ones), waits until each has its first token, then a second wave of long
prompts, and signals a decode worker once the worker itself reports both kinds of request:
streams decoding from received KV and reservations still waiting for it
(``disagg_stats``), never after a sleep.

- SIGKILL: every stream of the killed worker migrates (the Processor re-sends prompt + tokens
  so far) and every client gets its whole answer;
- SIGTERM: the worker drains: it still accepts the KV of the reservations it made, decodes
  from it, and every client gets its whole answer, none of it migrated;
- SIGKILL of every decode worker: each stream ends with a ``worker_lost`` error event;
- SIGTERM to ``servegrid serve`` with prefills still queued: every stream completes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from servegrid.distributed import env
from servegrid.distributed.discovery.file import FileDiscovery
from servegrid.distributed.embedded_nats import free_port
from servegrid.distributed.runtime import DistributedRuntime
from tests.integration.pipeline_nodes import service_children
from tests.support.serving import REPO, ServedGraph, serve
from tests.support.streams import StreamResult, chat_body, start_streams, stream_chat, wait_models

DISAGG = str(REPO / "configs" / "disagg.yaml")
NAMESPACE = "disagg-lifecycle"
MAX_TOKENS = 300  # at speedup 0.5, seconds of decoding: longer than any signal takes
LONG_WORDS = 400  # a long prompt: well over max-local-prefill-length, so prefilled remotely
CLUSTER_SECRET = "disagg-lifecycle-test-secret-0123"


@dataclass
class Graph:
    served: ServedGraph
    url: str
    discovery: Path


@pytest.fixture(scope="module")
def graph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Graph]:
    """Two decode workers and a slow prefill worker; shared by the tests below, in order."""
    port = free_port()
    discovery = tmp_path_factory.mktemp("disagg-lifecycle") / "discovery"
    args = [
        "-f",
        DISAGG,
        f"--Frontend.port={port}",
        "--Frontend.host=127.0.0.1",
        "--Worker.ServiceArgs.workers=2",
        "--Worker.speedup-ratio=0.5",
        "--Worker.max-local-prefill-length=64",
        "--Worker.max-prefill-queue-size=16",
        "--PrefillWorker.speedup-ratio=0.03",  # a remote prefill takes about a second
    ]
    environment = {
        env.SERVEGRID_DISCOVERY_DIR: str(discovery),
        env.SERVEGRID_NAMESPACE: NAMESPACE,
        # Served as a cluster is: every request-plane and KV-transfer connection authenticated.
        env.SERVEGRID_CLUSTER_SECRET: CLUSTER_SECRET,
    }
    with serve(args, env=environment) as served:
        url = f"http://127.0.0.1:{port}"
        served.wait_for_output("Worker ready", timeout=90, count=2)
        served.wait_for_output("PrefillWorker ready", timeout=90)
        wait_models(url, served)
        yield Graph(served, url, discovery)


@pytest.fixture
async def runtime(graph: Graph) -> AsyncIterator[DistributedRuntime]:
    rt = DistributedRuntime(FileDiscovery(graph.discovery), cluster_secret=CLUSTER_SECRET)
    try:
        yield rt
    finally:
        await rt.shutdown(drain_timeout=0)


def long_body(seed: int) -> dict:
    body = chat_body(seed, MAX_TOKENS)
    text = f"Story {seed} begins. " + "the quick brown fox jumps over a lazy dog " * (
        LONG_WORDS // 9
    )
    body["messages"] = [{"role": "user", "content": text}]
    return body


async def decode_workers(runtime: DistributedRuntime) -> dict[int, dict]:
    """pid → ``disagg_stats`` plus ``load`` of every registered decode worker."""
    stats_client = await runtime.client(NAMESPACE, "Worker", "disagg_stats")
    load_client = await runtime.client(NAMESPACE, "Worker", "load")
    found = {}
    for info in stats_client.instances():
        try:
            stats = await (await stats_client.direct(None, info.instance_id)).single()
            load = await (await load_client.direct(None, info.instance_id)).single()
        except Exception:  # a worker that is going away: not a candidate
            continue
        found[info.metadata["pid"]] = {**stats, **load}
    return found


async def wait_for_decode_workers(graph: Graph, runtime: DistributedRuntime, count: int) -> None:
    client = await runtime.client(NAMESPACE, "Worker", "disagg_stats")
    await client.wait_for_instances(count, timeout=90)
    wait_models(graph.url, graph.served)


async def prefill_handled(runtime: DistributedRuntime) -> list[dict]:
    client = await runtime.client(NAMESPACE, "PrefillWorker", "status")
    [instance] = await client.wait_for_instances(1, timeout=30)
    return (await (await client.direct(None, instance)).single())["handled"]


async def worker_with_both_kinds(runtime: DistributedRuntime) -> tuple[int, dict]:
    """A decode worker decoding from received KV while another reservation waits for KV."""
    deadline = time.monotonic() + 60
    seen: dict[int, dict] = {}
    while time.monotonic() < deadline:
        seen = await decode_workers(runtime)
        for pid, stats in seen.items():
            if stats["pending_transfers"] >= 1 and stats["decoding_from_remote_kv"] >= 1:
                return pid, stats
        await asyncio.sleep(0.02)
    raise AssertionError(f"no decode worker held both kinds of request: {seen}")


async def two_waves(
    http: httpx.AsyncClient, graph: Graph, first_seed: int
) -> tuple[list[StreamResult], list[asyncio.Task]]:
    """Four long and four short streams, each past its first token; then four long ones."""
    first = [long_body(first_seed + n) for n in range(4)]
    first += [chat_body(first_seed + 4 + n, MAX_TOKENS) for n in range(4)]
    results, tasks = await start_streams(http, graph.url, first)
    second = [StreamResult() for _ in range(4)]
    tasks += [
        asyncio.create_task(stream_chat(http, graph.url, long_body(first_seed + 8 + n), result))
        for n, result in enumerate(second)
    ]
    return results + second, tasks


def assert_all_complete(results: list[StreamResult], graph: Graph) -> None:
    broken = [(i, r.failure, r.error) for i, r in enumerate(results) if not r.complete]
    assert broken == [], (
        f"{len(broken)} of {len(results)} streams did not complete: {broken[:3]}\n"
        f"serve's log:\n{graph.served.text()[-6000:]}"
    )
    assert [r.completion_tokens for r in results] == [MAX_TOKENS] * len(results)


async def test_sigkill_of_a_decode_worker_migrates_every_stream(graph: Graph, runtime):
    await wait_for_decode_workers(graph, runtime, 2)
    moved_before = graph.served.text().count("continuing on worker")
    async with httpx.AsyncClient(timeout=120) as http:
        results, tasks = await two_waves(http, graph, first_seed=0)
        pid, stats = await worker_with_both_kinds(runtime)
        os.kill(pid, signal.SIGKILL)
        await asyncio.gather(*tasks)
    assert_all_complete(results, graph)
    moved = graph.served.text().count("continuing on worker") - moved_before
    # Each stream it decoded and each reservation it held moved to the other worker.
    # The streams it decoded from received KV moved to the other worker (the Processor says
    # so); the reservations still waiting for KV had sent nothing, so the request plane's
    # retry sent them to the other worker (where a prefill worker computed their KV again).
    assert moved >= stats["decoding_from_remote_kv"], stats
    assert "Traceback" not in graph.served.text()


async def test_sigterm_of_a_decode_worker_drains_its_pending_remote_prefills(graph: Graph, runtime):
    await wait_for_decode_workers(graph, runtime, 2)  # the killed one was restarted
    labels = {pid: label for label, pid in service_children(graph.served.pid).items()}
    moved_before = graph.served.text().count("continuing on worker")
    handled_before = len(await prefill_handled(runtime))
    async with httpx.AsyncClient(timeout=120) as http:
        results, tasks = await two_waves(http, graph, first_seed=100)
        pid, stats = await worker_with_both_kinds(runtime)
        os.kill(pid, signal.SIGTERM)
        await asyncio.gather(*tasks)
    assert_all_complete(results, graph)
    # Nothing moved: the draining worker finished what it had, its awaited KV included...
    assert graph.served.text().count("continuing on worker") == moved_before
    label = labels[pid]
    graph.served.wait_for_output(f"[{label}] INFO servegrid.host: drained", timeout=30)
    [drained] = [line for line in graph.served.output if f"[{label}]" in line and "drained" in line]
    count = int(drained.split("drained ")[1].split()[0])
    assert count >= stats["decoding_from_remote_kv"] + stats["pending_transfers"], (drained, stats)
    # ...and every KV the prefill worker sent was taken, none refused by a leaving worker.
    handled = (await prefill_handled(runtime))[handled_before:]
    assert [h["outcome"] for h in handled] == ["sent"] * 8, handled
    graph.served.wait_for_output("Worker ready", timeout=90, count=4)


async def test_sigkill_of_every_decode_worker_ends_each_stream_with_an_error(graph: Graph, runtime):
    await wait_for_decode_workers(graph, runtime, 2)
    async with httpx.AsyncClient(timeout=120) as http:
        results, tasks = await start_streams(
            http, graph.url, [long_body(200), chat_body(201, MAX_TOKENS)]
        )
        for label, pid in service_children(graph.served.pid).items():
            if label.startswith("Worker:"):
                os.kill(pid, signal.SIGKILL)
        await asyncio.gather(*tasks)
    for result in results:
        assert result.failure == "", result.failure
        assert result.finish_reason is None
        assert result.error is not None and result.error["code"] == "worker_lost", result.error
    assert "Traceback" not in graph.served.text()


async def test_sigterm_to_serve_completes_every_stream_with_prefills_still_queued(
    graph: Graph, runtime
):
    """The whole graph stops: its prefill worker takes no new item, so the decode workers
    prefill what is still queued themselves (not after remote-prefill-timeout) and drain."""
    await wait_for_decode_workers(graph, runtime, 2)  # both were killed and restarted
    async with httpx.AsyncClient(timeout=120) as http:
        first = [long_body(300), long_body(301)]
        first += [chat_body(302 + n, MAX_TOKENS) for n in range(2)]
        results, tasks = await start_streams(http, graph.url, first)
        second = [StreamResult() for _ in range(8)]  # twice the prefill worker's 4 slots
        tasks += [
            asyncio.create_task(stream_chat(http, graph.url, long_body(310 + n), result))
            for n, result in enumerate(second)
        ]
        deadline = time.monotonic() + 60
        while sum(s["pending_transfers"] for s in (await decode_workers(runtime)).values()) < 5:
            assert time.monotonic() < deadline, "the prefill queue never held an untaken item"
            await asyncio.sleep(0.02)
        graph.served.proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*tasks)
    assert_all_complete(results + second, graph)
    assert await asyncio.to_thread(graph.served.proc.wait, 60) == 0
    assert "killing it" not in graph.served.text()
    assert "no prefill worker is left to take it" in graph.served.text()
