"""The exec probe for services without an HTTP port: registered from this host or not."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from servegrid.distributed import env
from servegrid.distributed.discovery.base import InstanceInfo
from servegrid.distributed.discovery.file import FileDiscovery


def probe(directory: Path, *args: str, host: str = "10.1.2.3") -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != env.ETCD_ENDPOINTS}
    environment[env.SERVEGRID_DISCOVERY_DIR] = str(directory)
    environment[env.SERVEGRID_ADVERTISE_HOST] = host
    return subprocess.run(
        [sys.executable, "-m", "servegrid.cli.probe", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_probe_passes_only_for_services_registered_from_this_host(tmp_path: Path) -> None:
    async def scenario() -> None:
        discovery = FileDiscovery(tmp_path)
        worker = InstanceInfo("servegrid", "Worker", "generate", 0xA1, "10.1.2.3", 40001)
        elsewhere = InstanceInfo("servegrid", "Router", "route", 0xB2, "10.9.9.9", 40002)
        await discovery.register(worker)
        await discovery.register(elsewhere)
        try:
            # the probe runs while this process holds the lease: the entries are live
            ok = await asyncio.to_thread(probe, tmp_path, "Worker", "--namespace", "servegrid")
            assert ok.returncode == 0, ok.stderr
            other_ns = await asyncio.to_thread(probe, tmp_path, "Worker", "--namespace", "demo")
            assert other_ns.returncode == 1
            router = await asyncio.to_thread(probe, tmp_path, "Router")
            assert router.returncode == 1
            assert "Router not registered from 10.1.2.3" in router.stderr
            await discovery.unregister(worker)
            gone = await asyncio.to_thread(probe, tmp_path, "Worker")
            assert gone.returncode == 1
        finally:
            await discovery.close()

    asyncio.run(scenario())


def test_probe_without_an_advertise_address_says_what_to_set(tmp_path: Path) -> None:
    done = probe(tmp_path, "Worker", host="")
    assert done.returncode == 2
    assert env.SERVEGRID_ADVERTISE_HOST in done.stderr
