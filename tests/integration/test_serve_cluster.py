"""`servegrid serve` in cluster mode: the pipeline across two nodes, and what survives faults.

Real etcd and nats-server (the fixtures), ``SERVEGRID_LEASE_TTL=3``. Every test asserts that no
request failed that should have succeeded.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator

import pytest

from servegrid.distributed.discovery.etcd import EtcdUnavailableError
from servegrid.distributed.runtime import DistributedRuntime
from tests.integration.pipeline_nodes import (
    LEASE_TTL,
    NODE_A,
    NODE_B,
    Load,
    call_ingress,
    endpoint_client,
    registered,
    servegrid_status_json,
    service_children,
    two_nodes,
)
from tests.integration.servers import EtcdServer, NatsServer
from tests.support.procs import cmdline, descendants_of, env_of, wait_gone

DELAY_FIRST = 0.5  # Shouter's think time before its first word, in the fault tests
OUTAGE = 30.0


@pytest.fixture
def cluster_env(
    etcd: EtcdServer, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    cluster = {
        "ETCD_ENDPOINTS": etcd.url,
        "NATS_SERVER": nats_server.url,
        "SERVEGRID_LEASE_TTL": f"{LEASE_TTL:g}",
    }
    for key, value in cluster.items():
        monkeypatch.setenv(key, value)
    # The test process only calls; keep whatever it would listen on to loopback.
    monkeypatch.setenv("SERVEGRID_ADVERTISE_HOST", "127.0.0.1")
    monkeypatch.setenv("SERVEGRID_BIND_HOST", "127.0.0.1")
    return cluster


@pytest.fixture
async def runtime(cluster_env: dict[str, str]) -> AsyncIterator[DistributedRuntime]:
    rt = await DistributedRuntime.from_env()
    yield rt
    await rt.shutdown(drain_timeout=0)


async def test_pipeline_runs_across_two_nodes_and_stops_cleanly(
    cluster_env: dict[str, str], runtime: DistributedRuntime, nats_server: NatsServer
) -> None:
    with two_nodes(cluster_env) as (node_a, node_b):
        ingress = await endpoint_client(runtime, "Ingress", "handle", 1)
        await endpoint_client(runtime, "Shouter", "shout", 2)

        replies = [await call_ingress(ingress, f"request {i}") for i in range(8)]
        assert replies[0]["text"] == "HELLO! REQUEST! 0!"
        shouters = service_children(node_b.pid)
        assert sorted(shouters) == ["Shouter:0", "Shouter:1"]
        used = {pid for reply in replies for pid in reply["shouter_pids"]}
        assert used == set(shouters.values()), f"both Shouter workers should serve, saw {used}"

        # Each node registered its own address; an operator sees the same in `servegrid status`.
        records = json.loads(await servegrid_status_json(cluster_env))
        hosts = sorted((r["component"], r["host"]) for r in records)
        assert hosts == [
            ("Counter", NODE_A),
            ("Ingress", NODE_A),
            ("Shouter", NODE_B),
            ("Shouter", NODE_B),
        ]

        # Cluster mode: the given NATS, no private server of serve's.
        node_a_children = service_children(node_a.pid)
        assert sorted(node_a_children) == ["Counter:0", "Ingress:0"]
        every_pid = [node_a.pid, node_b.pid, *node_a_children.values(), *shouters.values()]
        for pid in [*node_a_children.values(), *shouters.values()]:
            assert env_of(pid)["NATS_SERVER"] == nats_server.url
        for supervisor in (node_a, node_b):
            extra = [cmdline(p) for p in descendants_of(supervisor.pid) if p not in every_pid]
            assert extra == [], f"unexpected processes under serve: {extra}"
            assert "private nats-server" not in supervisor.text()

        for supervisor in (node_a, node_b):
            left = supervisor.stop()
            assert left == [], f"left after SIGTERM: {[cmdline(p) for p in left]}"
            assert supervisor.proc.returncode == 0
        assert wait_gone(every_pid, 5) == []
        # Graceful shutdown removes registrations at once, without waiting for the lease.
        assert await registered(runtime) == []


async def test_killed_worker_is_skipped_at_once_expires_and_its_request_is_retried(
    cluster_env: dict[str, str], runtime: DistributedRuntime
) -> None:
    shouter_args = (f"--Shouter.delay-first={DELAY_FIRST}",)
    with two_nodes(cluster_env, shouter_args) as (_node_a, node_b):
        ingress = await endpoint_client(runtime, "Ingress", "handle", 1)
        shouter_client = await endpoint_client(runtime, "Shouter", "shout", 2)
        workers = service_children(node_b.pid)
        victim, survivor = workers["Shouter:0"], workers["Shouter:1"]
        [victim_id] = [
            i.instance_id for i in await registered(runtime) if i.metadata["pid"] == victim
        ]

        load = Load(ingress, callers=4)
        load_task = asyncio.create_task(load.run())
        try:
            await load.until(
                lambda: load.used_pids() >= {victim, survivor}, 15, "both workers used"
            )
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)

            # Its registration disappears when its lease runs out, without anyone unregistering.
            deadline = killed_at + LEASE_TTL + 3
            while any(i.instance_id == victim_id for i in await registered(runtime)):
                assert time.monotonic() < deadline, "the killed worker is still registered"
                await asyncio.sleep(0.1)
            deregistered_after = time.monotonic() - killed_at

            # The supervisor restarts it; the load goes on until the new worker has served.
            await asyncio.to_thread(node_b.wait_for_output, "Shouter ready", 30, 3)
            replacement = service_children(node_b.pid)["Shouter:0"]
            await load.until(lambda: replacement in load.used_pids(), 15, "replacement used")
        finally:
            load.stop.set()
            await asyncio.wait_for(load_task, 30)

        assert load.failures() == [], [
            (round(o.started - killed_at, 2), round(o.ended - killed_at, 2), o.error)
            for o in load.outcomes
            if o.error
        ]
        in_flight_at_kill = [o for o in load.outcomes if o.started < killed_at < o.ended]
        after_kill = [o for o in load.outcomes if o.started > killed_at]
        assert in_flight_at_kill  # requests were mid-flight at the kill, and none failed
        # Skipped at once: no request sent after the kill was answered by the dead worker
        # (whose registration outlived it for a lease TTL). Timing is bench's business.
        assert victim not in load.used_pids(since=killed_at)
        assert after_kill
        slowest = max(o.ended - o.started for o in after_kill)
        print(
            f"\nkill: {len(load.outcomes)} requests, 0 failed; {len(in_flight_at_kill)} in flight "
            f"at the kill; slowest after it {slowest:.2f}s; deregistered after "
            f"{deregistered_after:.2f}s (TTL {LEASE_TTL:g}s)"
        )

        # Deterministically: a request sent to one worker, which dies before its first
        # response, is answered by another worker (EndpointClient.call_with_retry).
        [survivor_id] = [
            i.instance_id for i in await registered(runtime) if i.metadata["pid"] == survivor
        ]
        words: list[dict] = []

        async def consume() -> None:
            async for word in shouter_client.call_with_retry("held", instance_id=survivor_id):
                words.append(word)

        call = asyncio.create_task(consume())
        # The worker says when it holds the request (inside its delay): kill it then.
        await asyncio.to_thread(node_b.wait_for_output, f"Shouter {survivor} holding 'held'", 15)
        os.kill(survivor, signal.SIGKILL)
        await asyncio.wait_for(call, DELAY_FIRST * 2 + 5)
        assert words == [{"word": "HELD!", "pid": replacement, "words": 1}]


async def _identities(runtime: DistributedRuntime) -> set[tuple[str, int, int]] | None:
    """(component, instance id, pid) of every registered instance; None while etcd (just
    restarted) does not answer the test's own client yet."""
    try:
        return {(i.component, i.instance_id, i.metadata["pid"]) for i in await registered(runtime)}
    except EtcdUnavailableError:
        return None


async def test_etcd_outage_of_30s_with_lost_store_keeps_requests_flowing_and_reregisters(
    cluster_env: dict[str, str], runtime: DistributedRuntime, etcd: EtcdServer
) -> None:
    with two_nodes(cluster_env) as (node_a, node_b):
        ingress = await endpoint_client(runtime, "Ingress", "handle", 1)
        await endpoint_client(runtime, "Shouter", "shout", 2)
        children = {**service_children(node_a.pid), **service_children(node_b.pid)}
        before = await _identities(runtime)
        assert {pid for *_, pid in before} == set(children.values())

        load = Load(ingress, callers=1, pause=0.05, max_seconds=OUTAGE + 30)
        load_task = asyncio.create_task(load.run())
        try:
            await load.until(lambda: len(load.outcomes) >= 5, 10, "requests before the outage")
            etcd.stop()
            stopped_at = time.monotonic()
            # The harder case: etcd comes back with an empty store (a replaced node, a store
            # on ephemeral disk), so nothing is registered until the services do it again.
            # (With its data kept, etcd renews the old leases on restart and nothing is lost.)
            shutil.rmtree(etcd.data_dir)
            await asyncio.sleep(OUTAGE)  # the outage itself
            etcd.start()  # same ports, empty store
            restarted_at = time.monotonic()

            # Every instance is registered again by the processes that were already running.
            while await _identities(runtime) != before:
                assert time.monotonic() - restarted_at < 15, "instances not registered again"
                await asyncio.sleep(0.1)
            back_after = time.monotonic() - restarted_at
            await load.until(
                lambda: sum(o.started > restarted_at + back_after for o in load.outcomes) >= 5,
                10,
                "requests after the outage",
            )
        finally:
            load.stop.set()
            await asyncio.wait_for(load_task, 30)

        assert load.failures() == []
        during = [o for o in load.outcomes if stopped_at < o.started and o.ended < restarted_at]
        assert len(during) >= OUTAGE * 5, f"only {len(during)} requests during the outage"
        assert load.used_pids(since=stopped_at) == set(service_children(node_b.pid).values())
        # No service restarted: same processes, and the supervisors saw no death.
        assert {**service_children(node_a.pid), **service_children(node_b.pid)} == children
        assert "died with" not in node_a.text() + node_b.text()
        records = json.loads(await servegrid_status_json(cluster_env))
        assert sorted(r["metadata"]["pid"] for r in records) == sorted(children.values())
        print(
            f"\netcd outage {OUTAGE:g}s, store lost: {len(during)} requests during it, 0 "
            f"failed; every instance registered {back_after:.2f}s after etcd came back"
        )
