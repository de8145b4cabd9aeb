"""Graphs on one machine: isolated unless they name one namespace on purpose.

Two ``servegrid serve -f configs/agg.yaml`` share a user's discovery directory, as they would
by default. Which graph's workers serve a request is read from the workers themselves (their
``load`` endpoint's ``active_requests`` while the requests stream), not guessed from timing.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from servegrid.distributed.discovery.file import FileDiscovery
from servegrid.distributed.embedded_nats import free_port
from servegrid.distributed.runtime import DistributedRuntime
from tests.integration.pipeline_nodes import service_children
from tests.support.serving import REPO, ServedGraph, serve
from tests.support.streams import (
    chat_body,
    namespace_of,
    start_streams,
    wait_models,
    worker_loads,
)

AGG = str(REPO / "configs" / "agg.yaml")
LOWLEVEL = REPO / "tests" / "system" / "graphs" / "lowlevel.yaml"


@contextmanager
def two_graphs(discovery: Path, *extra: str) -> Iterator[list[tuple[ServedGraph, str]]]:
    """Two agg graphs on two ports, one discovery directory; (served, url) of each."""
    env = {"SERVEGRID_DISCOVERY_DIR": str(discovery)}
    with ExitStack() as stack:
        graphs = []
        for _ in range(2):
            port = free_port()
            args = ["-f", AGG, f"--Frontend.port={port}", "--Frontend.host=127.0.0.1"]
            args += ["--Worker.speedup-ratio=1", *extra]
            graphs.append((stack.enter_context(serve(args, env=env)), f"http://127.0.0.1:{port}"))
        for served, url in graphs:
            served.wait_for_output("Worker ready", timeout=90, count=2)
            wait_models(url, served)
        yield graphs


def _pids(served: ServedGraph) -> set[int]:
    return {pid for label, pid in service_children(served.pid).items() if "Worker" in label}


async def _load_by_graph(discovery: Path, a: ServedGraph, b: ServedGraph) -> tuple[int, int]:
    loads = await worker_loads(discovery)
    assert set(loads) == _pids(a) | _pids(b), loads
    return sum(loads[p] for p in _pids(a)), sum(loads[p] for p in _pids(b))


def _status(discovery: Path, *args: str) -> list[dict]:
    result = subprocess.run(
        [sys.executable, "-m", "servegrid.cli", "status", "--json", *args],
        env={**os.environ, "SERVEGRID_DISCOVERY_DIR": str(discovery)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def test_two_graphs_of_one_config_serve_only_their_own_requests(tmp_path: Path):
    discovery = tmp_path / "discovery"
    with two_graphs(discovery) as [(a, url_a), (b, _url_b)]:
        async with httpx.AsyncClient(timeout=120) as http:
            bodies = [chat_body(seed, 300) for seed in range(8)]
            _results, tasks = await start_streams(http, url_a, bodies)
            try:
                assert await _load_by_graph(discovery, a, b) == (8, 0)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        ns_a, ns_b = namespace_of(a), namespace_of(b)
        assert ns_a != ns_b
        # `servegrid status`, as an operator runs it, shows both graphs apart.
        records = _status(discovery)
        assert {r["namespace"] for r in records} == {ns_a, ns_b}
        only_a = _status(discovery, "--namespace", ns_a)
        assert {r["namespace"] for r in only_a} == {ns_a}
        assert sorted({r["component"] for r in only_a}) == ["Frontend", "Processor", "Worker"]
        assert {r["metadata"]["pid"] for r in only_a if r["component"] == "Worker"} == _pids(a)


async def test_graphs_that_name_one_namespace_share_their_workers(tmp_path: Path):
    discovery = tmp_path / "discovery"
    with two_graphs(discovery, "--namespace", "shared-test") as [(a, url_a), (b, _url_b)]:
        assert namespace_of(a) == namespace_of(b) == "shared-test"
        async with httpx.AsyncClient(timeout=120) as http:
            # A's Processor sees B's workers one discovery poll after they registered: try
            # until the round robin has reached them (bounded).
            for _ in range(10):
                bodies = [chat_body(seed, 300) for seed in range(8)]
                _results, tasks = await start_streams(http, url_a, bodies)
                try:
                    on_a, on_b = await _load_by_graph(discovery, a, b)
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                if on_b:
                    break
            assert on_a + on_b == 8 and on_b > 0, (on_a, on_b)


async def test_the_seed_low_level_path_reaches_the_worker_by_its_public_address(tmp_path: Path):
    discovery = tmp_path / "discovery"
    env = {"SERVEGRID_DISCOVERY_DIR": str(discovery)}
    with serve(["-f", str(LOWLEVEL)], env=env) as served:
        served.wait_for_output("Caller ready", timeout=60)
        served.wait_for_output("Worker ready", timeout=60)
        namespace = namespace_of(served)
        runtime = DistributedRuntime(FileDiscovery(discovery))
        try:
            client = (
                await runtime.namespace(namespace).component("Caller").endpoint("echo").client()
            )
            await client.wait_for_instances(1, timeout=30)
            answer = await asyncio.wait_for((await client.round_robin([7, 8, 9])).single(), 30)
        finally:
            await runtime.shutdown(drain_timeout=0)
    assert answer == {"namespace": namespace, "component": "Worker", "tokens": [7, 8, 9]}
