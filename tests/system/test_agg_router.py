"""The Router graph (configs/agg_router.yaml) served as a user serves it, outside the bench."""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from servegrid.distributed.embedded_nats import free_port
from tests.integration.pipeline_nodes import service_children
from tests.support.serving import REPO, serve
from tests.support.streams import chat_body, namespace_of, wait_models

AGG_ROUTER = str(REPO / "configs" / "agg_router.yaml")


def test_agg_router_serves_through_its_router_process(tmp_path):
    port = free_port()
    env = {"SERVEGRID_DISCOVERY_DIR": str(tmp_path / "discovery")}
    args = ["-f", AGG_ROUTER, f"--Frontend.port={port}", "--Frontend.host=127.0.0.1"]
    args += ["--Worker.speedup-ratio=50"]
    with serve(args, env=env) as served:
        url = f"http://127.0.0.1:{port}"
        served.wait_for_output("Router ready", timeout=90)
        served.wait_for_output("Worker ready", timeout=90, count=2)
        wait_models(url, served)
        assert sorted(service_children(served.pid)) == [
            "Processor,Frontend:0",
            "Router:0",
            "Worker:0",
            "Worker:1",
        ]
        texts = []
        for seed in range(4):
            reply = httpx.post(
                f"{url}/v1/chat/completions", json=chat_body(seed, 8, False), timeout=30
            )
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] == 8
            texts.append(reply.json()["choices"][0]["message"]["content"])
        assert all(texts)
        assert namespace_of(served).startswith("servegrid-")
        # The Processor asks the Router for each request: with the Router frozen, a request
        # gets no answer at all (a frozen process never replies, so the timeout is certain).
        router_pid = service_children(served.pid)["Router:0"]
        os.kill(router_pid, signal.SIGSTOP)
        try:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/chat/completions", json=chat_body(9, 4, False), timeout=3)
        finally:
            os.kill(router_pid, signal.SIGCONT)
        reply = httpx.post(f"{url}/v1/chat/completions", json=chat_body(9, 4, False), timeout=30)
        assert reply.status_code == 200
