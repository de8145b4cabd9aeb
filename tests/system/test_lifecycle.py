"""Stops, kills and drains of a served graph (configs/agg.yaml), with streams in flight.

What a user sees over HTTP, and what the serve log says:
- SIGTERM to one Worker: it leaves discovery and finishes its streams, then exits;
- SIGKILL of one Worker: its streams continue on the other worker (migration), with the same
  tokens a seeded request produces anyway;
- SIGKILL of the only Worker: each of its streams ends with an OpenAI error event, and the log
  has one line per request, no traceback;
- SIGTERM to ``servegrid serve``: every stream in flight completes before it exits.

The worker-side signal that a request is being served is the Worker's ``load`` endpoint
(``active_requests``), never a sleep.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from servegrid.distributed.embedded_nats import free_port
from tests.integration.pipeline_nodes import service_children
from tests.support.serving import REPO, ServedGraph, serve
from tests.support.streams import (
    StreamResult,
    chat_body,
    start_streams,
    wait_models,
    worker_loads,
)

AGG = str(REPO / "configs" / "agg.yaml")
STREAMS = 20
# speedup 1: a few milliseconds a token, so 300 tokens outlast every signal the tests send
MAX_TOKENS = 300


@dataclass
class Graph:
    served: ServedGraph
    url: str
    discovery: Path


@contextmanager
def agg_graph(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> Iterator[Graph]:
    port = free_port()
    discovery = tmp_path / "discovery"
    args = [
        "-f",
        AGG,
        f"--Frontend.port={port}",
        "--Frontend.host=127.0.0.1",
        "--Worker.speedup-ratio=1",
        *extra,
    ]
    full_env = {"SERVEGRID_DISCOVERY_DIR": str(discovery), **(env or {})}
    with serve(args, env=full_env) as served:
        url = f"http://127.0.0.1:{port}"
        workers = 1 if "--Worker.ServiceArgs.workers=1" in extra else 2
        served.wait_for_output("Worker ready", timeout=90, count=workers)
        wait_models(url, served)
        yield Graph(served, url, discovery)


def bodies(count: int = STREAMS, max_tokens: int = MAX_TOKENS) -> list[dict]:
    return [chat_body(seed, max_tokens) for seed in range(count)]


def assert_all_complete(
    results: list[StreamResult], graph: Graph, max_tokens: int = MAX_TOKENS
) -> None:
    broken = [(i, r.failure, r.error) for i, r in enumerate(results) if not r.complete]
    assert broken == [], (
        f"{len(broken)} of {len(results)} streams did not complete: {broken[:3]}\n"
        f"serve's log:\n{graph.served.text()[-6000:]}"
    )
    assert [r.finish_reason for r in results] == ["length"] * len(results)
    assert [r.completion_tokens for r in results] == [max_tokens] * len(results)


async def busy_workers(graph: Graph) -> dict[str, tuple[int, int]]:
    """``Worker:i`` → (pid, active requests) of this graph's workers."""
    workers = {
        label: pid
        for label, pid in service_children(graph.served.pid).items()
        if label.startswith("Worker:")
    }
    loads = await worker_loads(graph.discovery)
    return {label: (pid, loads.get(pid, 0)) for label, pid in workers.items()}


async def start_on_every_worker(
    http: httpx.AsyncClient, graph: Graph, count: int = STREAMS
) -> tuple[list[StreamResult], list[asyncio.Task], dict[str, tuple[int, int]]]:
    """Start ``count`` streams once the Processor spreads them over every worker.

    A worker that just (re)started is seen by the Processor one discovery poll after it
    registered; until then round robin sends it nothing. A try that leaves a worker idle is
    cancelled (closing the streams frees the workers) and made again.
    """
    for _ in range(10):
        results, tasks = await start_streams(http, graph.url, bodies(count))
        loads = await busy_workers(graph)
        if len(loads) == 2 and all(active > 0 for _pid, active in loads.values()):
            return results, tasks, loads
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    raise AssertionError(f"the load never reached both workers: {loads}")


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lifecycle")


@pytest.fixture(scope="module")
def graph(module_tmp: Path) -> Iterator[Graph]:
    """Two workers; shared by the tests below, in order (the last one stops it)."""
    with agg_graph(module_tmp) as served_graph:
        yield served_graph


async def test_sigterm_to_a_worker_finishes_its_streams_before_it_exits(graph: Graph):
    async with httpx.AsyncClient(timeout=120) as http:
        results, tasks, before = await start_on_every_worker(http, graph)
        pid, active = before["Worker:0"]  # it holds streams when it is told to stop
        os.kill(pid, signal.SIGTERM)
        await asyncio.gather(*tasks)
    assert_all_complete(results, graph)
    # It drained (what it had, not fewer) and exited on its own; the supervisor starts it again.
    graph.served.wait_for_output("[Worker:0] INFO servegrid.host: drained", timeout=30)
    drained = [line for line in graph.served.output if "Worker:0" in line and "drained" in line]
    assert f"drained {active} in-flight request(s)" in drained[-1], drained
    assert "killing it" not in graph.served.text()
    graph.served.wait_for_output("Worker ready", timeout=90, count=3)


async def test_sigkill_of_a_worker_migrates_its_streams_with_identical_output(graph: Graph):
    wait_models(graph.url, graph.served)
    migrated_before = graph.served.text().count("continuing on worker")
    async with httpx.AsyncClient(timeout=120) as http:
        results, tasks, before = await start_on_every_worker(http, graph)
        pid, active = before["Worker:1"]
        os.kill(pid, signal.SIGKILL)
        await asyncio.gather(*tasks)
        assert_all_complete(results, graph)
        # Seeded: the same request again, whole and on a live worker, gives the same text.
        for seed, result in enumerate(results):
            again = await http.post(
                f"{graph.url}/v1/chat/completions", json=chat_body(seed, MAX_TOKENS, False)
            )
            assert again.json()["choices"][0]["message"]["content"] == result.text, seed
    moved = graph.served.text().count("continuing on worker") - migrated_before
    assert moved == active, graph.served.text()[-3000:]
    assert "Traceback" not in graph.served.text()


async def test_sigterm_to_serve_completes_every_stream_in_flight(graph: Graph):
    wait_models(graph.url, graph.served)
    async with httpx.AsyncClient(timeout=120) as http:
        results, tasks, _ = await start_on_every_worker(http, graph)
        graph.served.proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*tasks)
    assert_all_complete(results, graph)
    assert await asyncio.to_thread(graph.served.proc.wait, 60) == 0
    assert "killing it" not in graph.served.text()
    # New connections are refused while it drains and after: the listener closed first.
    async with httpx.AsyncClient(timeout=2) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"{graph.url}/health")


async def test_when_no_worker_is_left_the_stream_ends_with_an_openai_error(tmp_path: Path):
    with agg_graph(tmp_path, "--Worker.ServiceArgs.workers=1") as single:
        async with httpx.AsyncClient(timeout=120) as http:
            results, tasks = await start_streams(http, single.url, bodies(count=3))
            [(pid, active)] = (await busy_workers(single)).values()
            assert active == 3
            os.kill(pid, signal.SIGKILL)
            await asyncio.gather(*tasks)
        for result in results:
            assert result.failure == ""
            assert result.finish_reason is None
            assert result.error is not None
            assert result.error["type"] == "service_unavailable_error"
            assert result.error["code"] == "worker_lost"
            assert "retry the request" in result.error["message"]
        single.served.wait_for_output("Worker ready", timeout=90, count=2)  # restarted
        log = single.served.text()
        assert log.count("failed: worker") == 3, log
        assert "Traceback" not in log
