"""`servegrid serve` of the three-service pipeline on one host, as a user runs it."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from servegrid.distributed.runtime import DistributedRuntime
from tests.support.procs import alive, children_of, cmdline, env_of, wait_gone
from tests.support.serving import REPO, serve

PIPELINE = REPO / "examples" / "pipeline"
ARGS = ["-f", str(PIPELINE / "pipeline.yaml"), "--working-dir", str(PIPELINE)]


@pytest.fixture
def discovery_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {"SERVEGRID_DISCOVERY_DIR": str(tmp_path / "discovery")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("ETCD_ENDPOINTS", raising=False)
    return env


async def _ingress_client(runtime: DistributedRuntime):
    client = await runtime.namespace("pipeline").component("Ingress").endpoint("handle").client()
    await client.wait_for_instances(1, timeout=60)
    return client


async def _call(client, text: str) -> dict:
    return await (await client.round_robin(text)).single()


@pytest.fixture
async def runtime(discovery_env) -> AsyncIterator[DistributedRuntime]:
    rt = await DistributedRuntime.from_env()
    yield rt
    await rt.shutdown(drain_timeout=1)


def _service_children(supervisor_pid: int) -> dict[str, int]:
    """Service label (from the child's environment) → pid, for the supervisor's children."""
    found = {}
    for pid in children_of(supervisor_pid):
        env = env_of(pid)
        if "SERVEGRID_SERVICES" in env:
            found[f"{env['SERVEGRID_SERVICES']}:{env['SERVEGRID_WORKER_INDEX']}"] = pid
    return found


async def _ready(served, runtime: DistributedRuntime):
    """Wait until every service is registered (Counter too: each Shouter call uses it); the
    Ingress client."""
    served.wait_for_output("Ingress ready", timeout=60)
    served.wait_for_output("Counter ready", timeout=60)
    client = await _ingress_client(runtime)
    shouters = await runtime.namespace("pipeline").component("Shouter").endpoint("shout").client()
    await shouters.wait_for_instances(2, timeout=30)
    return client


async def test_serve_runs_the_graph_uses_both_workers_and_stops_cleanly(discovery_env, runtime):
    with serve(ARGS, env=discovery_env) as served:
        client = await _ready(served, runtime)

        replies = [await _call(client, f"request {i}") for i in range(8)]
        assert replies[0]["text"] == "HELLO! REQUEST! 0!"
        used = {pid for reply in replies for pid in reply["shouter_pids"]}
        assert len(used) == 2, f"expected both Shouter workers to serve, saw {used}"

        children = _service_children(served.pid)
        assert sorted(children) == ["Counter:0", "Ingress:0", "Shouter:0", "Shouter:1"]
        every_pid = [served.pid, *children.values()]

        left = served.stop()
        assert left == [], f"processes left after SIGTERM: {[cmdline(p) for p in left]}"
        assert wait_gone(every_pid, 5) == []
        assert served.proc.returncode == 0
        # shutdown hooks ran
        assert "Ingress shutting down after 8 requests" in served.text()


async def test_a_killed_worker_is_restarted_and_serves_again(discovery_env, runtime):
    with serve(ARGS, env=discovery_env) as served:
        client = await _ready(served, runtime)

        victim = _service_children(served.pid)["Shouter:1"]
        os.kill(victim, signal.SIGKILL)
        assert wait_gone([victim], 5) == []
        served.wait_for_output("Shouter:1 (pid", timeout=10)  # the supervisor noticed

        # requests keep succeeding while it restarts: the dead instance is skipped
        for i in range(5):
            assert (await _call(client, f"during {i}"))["text"].startswith("HELLO!")

        served.wait_for_output("Shouter ready", count=3, timeout=30)
        replacement = _service_children(served.pid)["Shouter:1"]
        assert replacement != victim and alive(replacement)

        seen: set[int] = set()
        for i in range(20):
            reply = await _call(client, f"after {i}")
            seen.update(reply["shouter_pids"])
            if replacement in seen:
                break
            await asyncio.sleep(0.05)
        assert replacement in seen, f"restarted worker {replacement} never served; saw {seen}"
