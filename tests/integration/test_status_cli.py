"""`servegrid status` against a real etcd."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from servegrid.distributed.discovery.base import InstanceInfo
from servegrid.distributed.discovery.etcd import EtcdDiscovery
from servegrid.distributed.embedded_nats import free_port
from tests.integration.servers import EtcdServer


async def run_status(*args: str, etcd_endpoints: str) -> tuple[int, str, str]:
    env = dict(os.environ, ETCD_ENDPOINTS=etcd_endpoints, COLUMNS="200")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from servegrid.cli.status import status; import typer; typer.run(status)",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode, out.decode(), err.decode()


async def test_status_lists_instances_as_json_and_table(etcd: EtcdServer) -> None:
    owner = EtcdDiscovery([etcd.url], ttl=5)
    try:
        await owner.register(InstanceInfo("demo", "Worker", "generate", 0xABC, "10.1.2.3", 7001))
        await owner.register(InstanceInfo("other", "Router", "route", 0x12, "10.1.2.4", 7002))

        code, out, err = await run_status("--json", "--namespace", "demo", etcd_endpoints=etcd.url)
        assert code == 0, err
        records = json.loads(out)
        assert [(r["component"], r["instance_id"], r["address"]) for r in records] == [
            ("Worker", "abc", "10.1.2.3:7001")
        ]
        assert 0 <= records[0]["age_seconds"] < 60

        code, out, err = await run_status(etcd_endpoints=etcd.url)
        assert code == 0, err
        assert "10.1.2.3:7001" in out and "10.1.2.4:7002" in out and "abc" in out
    finally:
        await owner.close()


async def test_status_with_unreachable_etcd_exits_2_with_one_line() -> None:
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    code, out, err = await run_status(etcd_endpoints=endpoint)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "etcd is unreachable" in lines[0] and endpoint in lines[0]
