"""examples/hello_world as its README runs it on several nodes, here on one machine.

Node 1 runs Frontend, Processor, Router and a DummyWorker; node 2 another DummyWorker; node 3,
started later, the PrefillWorker. They share a real nats-server and one discovery directory
(etcd on real nodes); each DummyWorker gets a host name to tell the replies apart.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from servegrid.distributed import env
from servegrid.distributed.embedded_nats import free_port
from tests.integration.servers import NatsServer, require_binary
from tests.support.serving import REPO, ServedGraph, serve

HELLO = REPO / "examples" / "hello_world"
DISAGG = ["-f", str(HELLO / "disagg.yaml"), "--working-dir", str(HELLO)]


@pytest.fixture(scope="module")
def cluster_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    binary = require_binary("nats-server", Path(sys.executable).parent / "nats-server")
    nats = NatsServer(binary, tmp_path_factory.mktemp("nats") / "store")
    nats.start()
    try:
        yield {
            env.NATS_SERVER: nats.url,
            env.SERVEGRID_DISCOVERY_DIR: str(tmp_path_factory.mktemp("discovery")),
        }
    finally:
        nats.stop()


@pytest.fixture(scope="module")
def nodes(cluster_env: dict[str, str]) -> Iterator[tuple[str, ServedGraph, ServedGraph]]:
    port = free_port()
    node1_args = [
        *DISAGG,
        "--service-name",
        "Frontend,Processor,Router,DummyWorker",
        f"--Frontend.port={port}",
        "--Frontend.host=127.0.0.1",
        "--DummyWorker.hostname=node1",
    ]
    node2_args = [*DISAGG, "--service-name", "DummyWorker", "--DummyWorker.hostname=node2"]
    with serve(node1_args, env=cluster_env) as node1, serve(node2_args, env=cluster_env) as node2:
        node1.wait_for_output("Frontend ready", timeout=90)
        node1.wait_for_output("DummyWorker ready", timeout=90)
        node2.wait_for_output("DummyWorker ready", timeout=90)
        yield f"http://127.0.0.1:{port}", node1, node2


def generate(url: str, prompt: str, request_id: str) -> dict:
    reply = httpx.post(
        f"{url}/generate", json={"prompt": prompt, "request_id": request_id}, timeout=30
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_agg_graph_resolves():
    agg = ["graph", "-f", str(HELLO / "agg.yaml"), "--working-dir", str(HELLO)]
    result = subprocess.run(
        [sys.executable, "-m", "servegrid.cli", *agg],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stderr
    assert "DummyWorker" in result.stdout and "PrefillWorker" not in result.stdout


def test_similar_prompts_land_on_the_same_worker(nodes):
    url, _, _ = nodes
    joke = generate(url, "Tell me a joke", "id_1")
    series = generate(url, "Which team won 2020 World Series", "id_2")
    fact = generate(url, "Tell me a fact", "id_3")
    host = joke["worker_output"].removeprefix("Tell me a joke_GeneratedBy_")
    other = series["worker_output"].removeprefix("Which team won 2020 World Series_GeneratedBy_")
    assert {host, other} == {"node1", "node2"}  # a new kind of prompt goes to the idle worker
    assert fact == {"worker_output": f"Tell me a fact_GeneratedBy_{host}", "request_id": "id_3"}
    assert joke["request_id"] == "id_1"


def test_bad_requests_are_answered_clearly(nodes):
    url, _, _ = nodes
    assert httpx.post(f"{url}/generate", json={"text": "x"}, timeout=10).status_code == 400
    assert httpx.get(f"{url}/generate", timeout=10).status_code == 404


def test_decode_worker_pushes_to_the_prefill_queue_and_the_prefill_worker_pulls(nodes, cluster_env):
    url, node1, node2 = nodes
    with serve([*DISAGG, "--service-name", "PrefillWorker"], env=cluster_env) as node3:
        node3.wait_for_output("PrefillWorker ready", timeout=90)
        # Both decode workers see the prefill worker once discovery tells them.
        for n in range(20):
            reply = generate(url, "This is prefill disagg serving example", f"12345-{n}")
            if f"prefilled 12345-{n}" in node3.text() or n == 19:
                break
        node3.wait_for_output(f"prefilled 12345-{n}", timeout=10)
        assert reply["request_id"] == f"12345-{n}"
        assert reply["worker_output"].startswith("This is prefill disagg serving example_")
        pushed = f"pushed 12345-{n} to the prefill queue"
        assert pushed in node1.text() + node2.text()
