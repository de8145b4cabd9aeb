"""EtcdDiscovery against a real etcd: leases, watches, and outages of etcd and of clients."""

from __future__ import annotations

import asyncio
import signal
import time

import aetcd

from servegrid.distributed.discovery.base import InstanceInfo, instance_prefix
from servegrid.distributed.discovery.etcd import EtcdDiscovery
from tests.integration.servers import EtcdServer, pid_alive
from tests.integration.watch_state import WatchState

TTL = 2.0


def info(instance_id: int, namespace: str = "it", port: int = 9000) -> InstanceInfo:
    return InstanceInfo(namespace, "Worker", "generate", instance_id, "127.0.0.1", port)


async def test_etcd_server_is_a_version_aetcd_speaks_to(etcd: EtcdServer) -> None:
    async with aetcd.Client(host="127.0.0.1", port=etcd.client_port, timeout=5) as client:
        status = await client.status()
    major, minor = (int(part) for part in status.version.split(".")[:2])
    assert (major, minor) >= (3, 4), status.version


REVOKE_TTL = 300.0  # a lease that cannot expire during the test: only a revoke removes it


async def test_register_list_watch_and_unregister(etcd: EtcdServer) -> None:
    owner = EtcdDiscovery([etcd.url], ttl=REVOKE_TTL)
    reader = EtcdDiscovery(f"127.0.0.1:{etcd.client_port}", ttl=TTL)
    prefix = instance_prefix("it")
    try:
        await owner.register(info(0xA1))
        async with WatchState(reader, prefix) as watch:
            # The first events are the current listing.
            await watch.wait_for(lambda w: w.ids() == {0xA1}, 5)
            await owner.register(info(0xA2, port=9001))
            await watch.wait_for(lambda w: w.ids() == {0xA1, 0xA2}, 5)
            listed = await reader.list(prefix)
            assert {i.instance_id for i in listed} == {0xA1, 0xA2}
            assert all(i.registered_at > 0 for i in listed)
            assert await reader.list(instance_prefix("other-namespace")) == []

            await owner.unregister(info(0xA1))
            await watch.wait_for(lambda w: w.ids() == {0xA2}, 5)
            # Closing revokes the lease: the rest vanishes, and not by expiry (the lease
            # would live for REVOKE_TTL), however slow the machine.
            await owner.close()
            await watch.wait_for(lambda w: w.ids() == set(), 60)
        assert [e.kind for e in watch.events] == ["put", "put", "delete", "delete"]
    finally:
        await owner.close()
        await reader.close()


async def test_entries_of_a_killed_process_expire_within_the_ttl(etcd: EtcdServer, spawn) -> None:
    reader = EtcdDiscovery([etcd.url])
    try:
        async with WatchState(reader, instance_prefix("crash")) as watch:
            child = await spawn("register.py", etcd.url, str(TTL), "crash", "b1,b2")
            assert await child.first_line() == "READY"
            await watch.wait_for(lambda w: w.ids() == {0xB1, 0xB2}, 5)
            child.signal(signal.SIGKILL)
            killed_at = time.monotonic()
            # Within the lease TTL plus etcd's expiry check granularity.
            await watch.wait_for(lambda w: w.ids() == set(), TTL + 2.0)
            assert time.monotonic() - killed_at >= TTL / 2  # gone by expiry, not by a revoke
    finally:
        await reader.close()


async def test_a_frozen_process_registers_again_after_its_lease_expired(
    etcd: EtcdServer, spawn
) -> None:
    """A process that could not reach etcd for longer than its TTL (here: SIGSTOP) finds its
    lease gone, takes a new one and puts its entries back without restarting."""
    reader = EtcdDiscovery([etcd.url])
    try:
        async with WatchState(reader, instance_prefix("frozen")) as watch:
            child = await spawn("register.py", etcd.url, str(TTL), "frozen", "c1,c2")
            assert await child.first_line() == "READY"
            await watch.wait_for(lambda w: w.ids() == {0xC1, 0xC2}, 5)
            first_lease = {e.key: e for e in watch.entries.values()}
            child.signal(signal.SIGSTOP)
            await watch.wait_for(lambda w: w.ids() == set(), TTL + 3.0)
            child.signal(signal.SIGCONT)
            await watch.wait_for(lambda w: w.ids() == {0xC1, 0xC2}, 5)
            assert child.process.returncode is None and pid_alive(child.pid)
            # The same entries, registered at the same time: re-put, not a new process.
            assert {e.key: e for e in watch.entries.values()} == first_lease
    finally:
        await reader.close()


async def test_etcd_down_30s_then_back_keeps_registrations_and_watchers(
    etcd: EtcdServer, spawn
) -> None:
    """The issue's outage: etcd stops for 30 s and comes back on the same address and data.

    The registering process is not restarted, the watcher keeps its membership during the
    outage and follows changes after it, and entries stay bound to a live lease."""
    reader = EtcdDiscovery([etcd.url])
    late = EtcdDiscovery([etcd.url], ttl=TTL)
    try:
        async with WatchState(reader, instance_prefix("outage")) as watch:
            child = await spawn("register.py", etcd.url, str(TTL), "outage", "d1,d2")
            assert await child.first_line() == "READY"
            await watch.wait_for(lambda w: w.ids() == {0xD1, 0xD2}, 5)

            etcd.stop()
            await asyncio.sleep(30)  # the outage itself
            assert watch.ids() == {0xD1, 0xD2}, "watcher must keep last-known membership"
            assert child.process.returncode is None, "registering process must survive"
            etcd.start()

            # A change after the restart reaches the watcher: it reconnected by itself.
            await late.register(info(0xD3, namespace="outage"))
            await watch.wait_for(lambda w: w.ids() == {0xD1, 0xD2, 0xD3}, 10)
            listed = {i.instance_id for i in await reader.list(instance_prefix("outage"))}
            assert listed == {0xD1, 0xD2, 0xD3}
            # The registering process's entries are bound to a lease it keeps alive: killing
            # it now makes them expire, which also proves the keepalive resumed.
            child.signal(signal.SIGKILL)
            await watch.wait_for(lambda w: w.ids() == {0xD3}, TTL + 2.0)
    finally:
        await late.close()
        await reader.close()


async def test_register_while_etcd_is_down_is_deferred_not_lost(etcd: EtcdServer) -> None:
    owner = EtcdDiscovery([etcd.url], ttl=TTL)
    reader = EtcdDiscovery([etcd.url])
    try:
        await owner.start()
        etcd.stop()
        await owner.register(info(0xE1, namespace="deferred"))  # returns; does not raise
        etcd.start()
        async with WatchState(reader, instance_prefix("deferred")) as watch:
            await watch.wait_for(lambda w: w.ids() == {0xE1}, 10)
    finally:
        await owner.close()
        await reader.close()
