"""A graph served with the cluster secret, as a cluster node runs it: its processes
authenticate to each other (and to their private NATS), and a process without the secret is
refused by every one of them."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from servegrid.distributed import env
from servegrid.distributed.errors import NoInstancesError
from servegrid.distributed.nats_plane import NatsUnavailableError
from servegrid.distributed.runtime import DistributedRuntime
from tests.support.serving import REPO, serve

PIPELINE = REPO / "examples" / "pipeline"
ARGS = ["-f", str(PIPELINE / "pipeline.yaml"), "--working-dir", str(PIPELINE)]
SECRET = "system-test-cluster-secret-0123"


@pytest.fixture
def node_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    secret_file = tmp_path / "cluster.secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    variables = {
        env.SERVEGRID_DISCOVERY_DIR: str(tmp_path / "discovery"),
        env.SERVEGRID_CLUSTER_SECRET_FILE: str(secret_file),
    }
    for key in (env.ETCD_ENDPOINTS, env.NATS_SERVER, env.SERVEGRID_CLUSTER_SECRET):
        monkeypatch.delenv(key, raising=False)
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    return variables


async def _handle(runtime: DistributedRuntime, text: str) -> dict:
    client = await runtime.namespace("pipeline").component("Ingress").endpoint("handle").client()
    await client.wait_for_instances(1, timeout=60)
    return await (await client.round_robin(text)).single()


@pytest.fixture
async def runtimes() -> AsyncIterator[list[DistributedRuntime]]:
    made: list[DistributedRuntime] = []
    yield made
    for runtime in made:
        await runtime.shutdown(drain_timeout=1)


async def test_a_graph_with_a_secret_serves_its_members_and_refuses_others(
    node_env, runtimes, monkeypatch
):
    with serve(ARGS, node_env) as served:
        served.wait_for_output("Ingress ready", timeout=60)
        served.wait_for_output("Shouter ready", count=2, timeout=60)
        nats_url = re.search(r"private nats-server at (\S+)", served.text())
        assert nats_url is not None
        monkeypatch.setenv(env.NATS_SERVER, nats_url.group(1))

        member = await DistributedRuntime.from_env()
        runtimes.append(member)
        answer = await _handle(member, "hi")
        assert answer["text"] == "HELLO! HI!"  # Ingress → Shouter passed the handshake too
        plane = await member.event_plane()  # the private NATS let the member in
        await plane.publish("pipeline.ping", b"x")

        monkeypatch.delenv(env.SERVEGRID_CLUSTER_SECRET_FILE)
        outsider = await DistributedRuntime.from_env()
        runtimes.append(outsider)
        with pytest.raises(NoInstancesError) as refused:
            await _handle(outsider, "let me in")
        assert "requires the cluster secret and this process has none" in str(refused.value)
        assert env.SERVEGRID_CLUSTER_SECRET_FILE in str(refused.value)
        with pytest.raises(NatsUnavailableError, match="requires credentials"):
            await outsider.event_plane()
        assert "Traceback" not in served.text()
