"""KV-aware routing end to end: ``configs/agg_router.yaml`` with ``Router.router-mode: kv``,
two mocker workers publishing KV events on a real nats-server, requests over HTTP.

What is asserted comes from the served graph itself: ``usage.prompt_tokens_details`` of the
responses, the frontend's ``/metrics`` (requests routed to each worker, overlap of each
decision) and the Router's ``state`` endpoint (its index, per worker).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from servegrid.distributed.discovery.base import KEY_ROOT
from servegrid.distributed.embedded_nats import free_port
from servegrid.distributed.errors import InstanceUnavailableError, NoInstancesError
from servegrid.distributed.runtime import DistributedRuntime
from tests.integration.servers import NatsServer
from tests.support.serving import REPO, serve

CONFIG = REPO / "configs" / "agg_router.yaml"
MODEL = "servegrid/tiny-chat"
SYSTEM = (
    "You are a careful assistant for a shipping company. Answer questions about parcels, "
    "delivery windows, customs forms and returns in plain words, and say when you do not know. "
)


def routed(metrics: str) -> dict[str, float]:
    """``servegrid_frontend_routed_requests_total`` by worker (hex id)."""
    pattern = r'servegrid_frontend_routed_requests_total\{worker="([0-9a-f]+)"\} (\S+)'
    return {w: float(v) for w, v in re.findall(pattern, metrics)}


def idle(state: dict) -> bool:
    """No active blocks, and every request the router sent reported finished by its worker."""
    return all(w["active_blocks"] == 0 and w["running"] == 0 for w in state["workers"].values())


def overlap_sum(metrics: str) -> float:
    found = re.search(r"servegrid_frontend_route_overlap_blocks_sum (\S+)", metrics)
    return float(found.group(1)) if found else 0.0


class Graph:
    def __init__(self, url: str, runtime: DistributedRuntime) -> None:
        self.url = url
        self.http = httpx.AsyncClient(base_url=url, timeout=30)
        self.runtime = runtime
        self.namespace = ""
        self.pids: dict[str, int] = {}  # worker or router instance (hex) -> pid
        self.router = ""  # the Router's instance (hex)

    async def metrics(self) -> str:
        return (await self.http.get("/metrics")).text

    async def complete(self, prompt: str, max_tokens: int = 2) -> dict:
        before = routed(await self.metrics())
        reply = await self.http.post(
            "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}
        )
        assert reply.status_code == 200, reply.text
        after = routed(await self.metrics())
        [worker] = [w for w in after if after[w] != before.get(w, 0)]
        body = reply.json()
        body["worker"] = worker
        return body

    async def router_state(self) -> dict:
        client = (
            await self.runtime.namespace(self.namespace)
            .component("Router")
            .endpoint("state")
            .client()
        )
        await client.wait_for_instances(1, timeout=30)
        stream = await client.round_robin(None)
        async for item in stream:
            return item
        raise AssertionError("Router.state answered nothing")

    async def until(self, condition, what: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        state: dict = {}
        while True:
            try:
                state = await self.router_state()
            except (InstanceUnavailableError, NoInstancesError):
                pass  # the router was killed: its successor registers shortly
            else:
                if condition(state):
                    return state
            assert time.monotonic() < deadline, f"{what} not seen in {timeout}s: {state}"
            await asyncio.sleep(0.1)


@pytest.fixture
async def graph(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Graph]:
    env = {"NATS_SERVER": nats_server.url, "SERVEGRID_DISCOVERY_DIR": str(tmp_path / "discovery")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("ETCD_ENDPOINTS", raising=False)
    port = free_port()
    args = [
        "-f",
        str(CONFIG),
        "--Router.router-mode=kv",
        f"--Frontend.port={port}",
        "--Frontend.host=127.0.0.1",
        "--Worker.speedup-ratio=1",
    ]
    with serve(args, env=env) as served:
        served.wait_for_output("Worker ready", count=2, timeout=120)
        served.wait_for_output("Router ready", timeout=60)
        served.wait_for_output("Frontend ready", timeout=60)
        runtime = await DistributedRuntime.from_env()
        g = Graph(f"http://127.0.0.1:{port}", runtime)
        try:
            entries = await runtime.discovery.list(f"{KEY_ROOT}/")
            g.namespace = next(e.namespace for e in entries if e.component == "Router")
            g.pids = {
                f"{e.instance_id:x}": e.metadata["pid"]
                for e in entries
                if e.component in ("Worker", "Router")
            }
            g.router = next(f"{e.instance_id:x}" for e in entries if e.component == "Router")
            yield g
        finally:
            await g.http.aclose()
            await runtime.shutdown(drain_timeout=0)


async def test_a_shared_prefix_goes_to_the_worker_that_holds_it_and_a_killed_worker_is_dropped(
    graph: Graph,
):
    state = await graph.until(
        lambda s: sum(w["member"] and w["in_sync"] for w in s["workers"].values()) == 2,
        "both workers indexed",
    )
    assert state["mode"] == "kv"
    # Warm up until each worker has served (and cached) something, so the processor's own
    # discovery view holds both too: a worker it does not know yet would be replaced by
    # another one at call time and the routing under test would not be what served.
    for i in range(30):
        await graph.complete(f"Warm-up number {i}: the quick brown fox jumps over the lazy dog.")
        state = await graph.until(idle, "idle after warm-up")
        if all(w["blocks"] > 0 for w in state["workers"].values()):
            break
    else:
        raise AssertionError(f"warm-up never reached both workers: {state}")

    blocks_before = {w: v["blocks"] for w, v in state["workers"].items()}
    first = await graph.complete(SYSTEM + "Where is parcel 1142?")
    owner = first["worker"]
    # The worker's stored events reach the router's index, and its load report says the
    # request is over (until then the router counts the request's blocks as load).
    await graph.until(
        lambda s: s["workers"][owner]["blocks"] > blocks_before[owner] and idle(s),
        "the first prompt's blocks",
    )

    overlap_before = overlap_sum(await graph.metrics())
    second = await graph.complete(SYSTEM + "How do I return a parcel?")
    assert second["worker"] == owner
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 16  # at least one block of the shared prefix came from the cache
    assert overlap_sum(await graph.metrics()) > overlap_before

    # A restarted router rebuilds its index from the workers' snapshots.
    indexed = (await graph.router_state())["workers"][owner]["blocks"]
    os.kill(graph.pids[graph.router], signal.SIGKILL)
    state = await graph.until(
        lambda s: s["decisions"] == 0 and s["workers"].get(owner, {}).get("blocks") == indexed,
        "a new router with the owner's blocks",
        timeout=60,
    )
    assert all(w["in_sync"] for w in state["workers"].values())

    await graph.until(idle, "both workers idle")
    served_by_owner = routed(await graph.metrics())[owner]
    # Busy the owner with a long generation; a prompt it does not hold goes by load instead.
    long_body = {"model": MODEL, "prompt": SYSTEM + "Tell me a story.", "max_tokens": 3000}
    async with graph.http.stream(
        "POST", "/v1/completions", json={**long_body, "stream": True}
    ) as busy:
        async for line in busy.aiter_lines():
            if line.startswith("data:"):
                break
        assert routed(await graph.metrics())[owner] == served_by_owner + 1
        other = await graph.complete("Completely unrelated words about mountains and rivers.")
        assert other["worker"] != owner
        assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

    # A killed worker leaves discovery and the index; nothing more goes to it.
    os.kill(graph.pids[owner], signal.SIGKILL)
    await graph.until(lambda s: owner not in s["workers"], "the killed worker dropped")
    for i in range(4):
        reply = await graph.complete(SYSTEM + f"Question number {i}?")
        assert reply["worker"] != owner
    assert routed(await graph.metrics())[owner] == served_by_owner + 1
