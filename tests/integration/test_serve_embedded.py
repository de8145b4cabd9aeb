"""`servegrid serve` with neither ETCD_ENDPOINTS nor NATS_SERVER: no server to install.

serve starts a private nats-server on loopback, hands its URL to every service, and removes
it (process and store directory) when it stops.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from servegrid.distributed.runtime import DistributedRuntime
from tests.integration.pipeline_nodes import ARGS, call_ingress, endpoint_client, service_children
from tests.support.procs import alive, cmdline, descendants_of, env_of
from tests.support.serving import serve


@pytest.fixture
def embedded_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nats_binary: Path
) -> dict[str, str]:
    monkeypatch.delenv("ETCD_ENDPOINTS", raising=False)
    monkeypatch.delenv("NATS_SERVER", raising=False)
    env = {"SERVEGRID_DISCOVERY_DIR": str(tmp_path / "discovery")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def _argument(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _private_nats(supervisor_pid: int) -> tuple[int, str, Path]:
    """The one nats-server under ``servegrid serve``: its pid, URL and store directory."""
    servers = [p for p in descendants_of(supervisor_pid) if "nats-server" in cmdline(p)]
    assert len(servers) == 1, [cmdline(p) for p in descendants_of(supervisor_pid)]
    argv = cmdline(servers[0]).split()
    store = Path(_argument(argv, "-sd"))
    assert _argument(argv, "-a") == "127.0.0.1" and "-js" in argv and store.is_dir()
    return servers[0], f"nats://127.0.0.1:{_argument(argv, '-p')}", store


def _exists(path: Path) -> bool:
    return path.exists()


async def test_serve_without_servers_runs_a_private_nats_and_removes_it(
    embedded_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve(ARGS, env=embedded_env) as served:
        served.wait_for_output("Ingress ready", timeout=60)
        nats_pid, url, store = _private_nats(served.pid)

        children = service_children(served.pid)
        assert sorted(children) == ["Counter:0", "Ingress:0", "Shouter:0", "Shouter:1"]
        assert {env_of(pid)["NATS_SERVER"] for pid in children.values()} == {url}

        # The private server really works: events and a JetStream work queue through the
        # runtime API, as services use it.
        monkeypatch.setenv("NATS_SERVER", url)
        runtime = await DistributedRuntime.from_env()
        try:
            ingress = await endpoint_client(runtime, "Ingress", "handle", 1)
            assert (await call_ingress(ingress, "there"))["text"] == "HELLO! THERE!"
            ns = runtime.namespace("pipeline")
            subscription = await ns.subscribe("ping")
            await (await runtime.nats_connection()).client.flush()
            await ns.publish("ping", b"pong")
            assert await asyncio.wait_for(anext(aiter(subscription)), 5) == b"pong"
            queue = await ns.work_queue("check", ack_wait=5)
            await queue.enqueue(b"job")
            item = await queue.dequeue(timeout=5)
            assert item is not None and item.data == b"job"
            await item.ack()
        finally:
            await runtime.shutdown(drain_timeout=0)

        left = served.stop()
        assert left == [], f"left after SIGTERM: {[cmdline(p) for p in left]}"
        assert served.proc.returncode == 0
        assert not alive(nats_pid)
        assert not _exists(store), f"{store} left behind"
