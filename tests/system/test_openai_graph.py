"""The aggregated graph (configs/agg.yaml) served as a user serves it, queried over HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from servegrid.distributed.embedded_nats import free_port
from servegrid.distributed.runtime import DistributedRuntime
from servegrid.llm.model_init import BUILTIN_MODEL
from tests.support.serving import REPO, ServedGraph, serve

AGG = str(REPO / "configs" / "agg.yaml")
NAMESPACE = "openai-graph-test"


def wait_healthy(url: str, served: ServedGraph, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served.proc.poll() is not None:
            raise AssertionError(f"servegrid serve exited:\n{served.text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url}/health not 200 after {timeout}s:\n{served.text()}")


class Graph:
    def __init__(self, url: str, env: dict[str, str], served: ServedGraph) -> None:
        self.url = url
        self.env = env
        self.served = served


@pytest.fixture(scope="module")
def graph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Graph]:
    port = free_port()
    env = {"SERVEGRID_DISCOVERY_DIR": str(tmp_path_factory.mktemp("discovery"))}
    args = ["-f", AGG, f"--Frontend.port={port}", "--Frontend.host=127.0.0.1"]
    args += [
        "--Worker.speedup-ratio=50",
        "--Worker.max-model-len=512",
        "--Processor.max-model-len=512",
    ]
    with serve(args, env=env) as served:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, served)
        yield Graph(url, env, served)


@pytest.fixture
def client(graph: Graph) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{graph.url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_lists_the_served_model(client: openai.OpenAI):
    assert [m.id for m in client.models.list().data] == [BUILTIN_MODEL]


def test_chat_completion(client: openai.OpenAI):
    reply = client.chat.completions.create(
        model=BUILTIN_MODEL,
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=12,
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens > 3


def test_chat_completion_streaming(client: openai.OpenAI):
    stream = client.chat.completions.create(
        model=BUILTIN_MODEL,
        messages=[{"role": "user", "content": "Stream please"}],
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert text
    assert finishes == ["length"]
    assert chunks[-1].usage.completion_tokens == 10


def test_completion_and_streaming_completion(client: openai.OpenAI):
    reply = client.completions.create(model=BUILTIN_MODEL, prompt="Once upon a time", max_tokens=8)
    assert reply.choices[0].text and reply.usage.completion_tokens == 8
    parts = list(
        client.completions.create(
            model=BUILTIN_MODEL, prompt="Once upon", max_tokens=6, stream=True
        )
    )
    assert "".join(p.choices[0].text for p in parts if p.choices)
    assert parts[-1].choices[0].finish_reason == "length"


def test_repeated_prompt_reports_cached_tokens(client: openai.OpenAI):
    messages = [{"role": "user", "content": "A long shared prefix " * 20}]
    client.chat.completions.create(model=BUILTIN_MODEL, messages=messages, max_tokens=2)
    # round-robin over two workers: by the third call both have seen the prompt
    client.chat.completions.create(model=BUILTIN_MODEL, messages=messages, max_tokens=2)
    third = client.chat.completions.create(model=BUILTIN_MODEL, messages=messages, max_tokens=2)
    assert third.usage.prompt_tokens_details.cached_tokens > 0


USER_X = [{"role": "user", "content": "x"}]
BAD_REQUESTS = [
    ("invalid-json", b'{"model": "x", "messages": [', 400, None),
    ("missing-messages", {"model": BUILTIN_MODEL, "max_tokens": 3}, 400, "messages"),
    ("messages-wrong-type", {"model": BUILTIN_MODEL, "messages": "hello"}, 400, "messages"),
    (
        "max-tokens-wrong-type",
        {"model": BUILTIN_MODEL, "messages": USER_X, "max_tokens": "many"},
        400,
        "max_tokens",
    ),
    (
        "negative-max-tokens",
        {"model": BUILTIN_MODEL, "messages": USER_X, "max_tokens": -1},
        400,
        "max_tokens",
    ),
    ("unknown-model", {"model": "no-such-model", "messages": USER_X}, 404, "model"),
    (
        "prompt-too-long",
        {
            "model": BUILTIN_MODEL,
            "messages": [{"role": "user", "content": "word " * 2000}],
            "max_tokens": 4,
        },
        400,
        "messages",
    ),
    (
        "prompt-of-5mb",
        {"model": BUILTIN_MODEL, "messages": [{"role": "user", "content": "word " * 1_000_000}]},
        400,
        "messages",
    ),
    ("seed-above-2**64", {"model": BUILTIN_MODEL, "messages": USER_X, "seed": 2**64}, 400, "seed"),
]


@pytest.mark.parametrize(
    ("case", "body", "status", "param"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(
    graph, client, case, body, status, param
):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(
        f"{graph.url}/v1/chat/completions",
        headers={"Content-Type": "application/json"},
        timeout=30,
        **kwargs,
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
    if case.startswith("prompt-"):
        assert "max-model-len" in error["message"]
        assert error["code"] == "context_length_exceeded"
    # and the next good request is served
    ok = client.chat.completions.create(
        model=BUILTIN_MODEL, messages=[{"role": "user", "content": "still there?"}], max_tokens=2
    )
    assert ok.usage.completion_tokens == 2


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    return {name: float(value) for name, value in samples}


def test_metrics_count_each_request_and_its_tokens(graph, client):
    chat_ok = 'servegrid_frontend_requests_total{endpoint="/v1/chat/completions",status="200"}'
    before = _metrics(graph.url)
    reply = client.chat.completions.create(
        model=BUILTIN_MODEL, messages=[{"role": "user", "content": "m"}], max_tokens=3
    )
    after = _metrics(graph.url)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew(chat_ok) == 1
    assert grew("servegrid_frontend_output_tokens_total") == reply.usage.completion_tokens == 3
    assert grew("servegrid_frontend_input_tokens_total") == reply.usage.prompt_tokens
    assert grew("servegrid_frontend_time_to_first_token_seconds_count") == 1
    assert grew("servegrid_frontend_request_duration_seconds_count") == 1
    assert after["servegrid_frontend_inflight_requests"] == 0


# -- a client that goes away frees its request in the worker ---------------------------


async def _active_requests(runtime: DistributedRuntime) -> int:
    client = await runtime.namespace(NAMESPACE).component("Worker").endpoint("load").client()
    total = 0
    for instance_id in client.instance_ids():
        total += (await (await client.direct(None, instance_id)).single())["active_requests"]
    return total


async def test_client_disconnect_mid_stream_frees_the_request_in_the_worker(
    tmp_path: Path, monkeypatch
):
    port = free_port()
    # named, so that this test process can find the graph's workers
    env = {"SERVEGRID_DISCOVERY_DIR": str(tmp_path / "discovery"), "SERVEGRID_NAMESPACE": NAMESPACE}
    monkeypatch.setenv("SERVEGRID_DISCOVERY_DIR", env["SERVEGRID_DISCOVERY_DIR"])
    # speedup 1: 100,000 tokens take minutes, far past the bounded waits below, so the request
    # can only end early because the client went away
    args = [
        "-f",
        AGG,
        f"--Frontend.port={port}",
        "--Frontend.host=127.0.0.1",
        "--Worker.speedup-ratio=1",
        "--Worker.max-model-len=131072",
        "--Processor.max-model-len=131072",
    ]
    with serve(args, env=env) as served:
        url = f"http://127.0.0.1:{port}"
        await asyncio.to_thread(wait_healthy, url, served)
        runtime = await DistributedRuntime.from_env()
        try:
            loads = await runtime.namespace(NAMESPACE).component("Worker").endpoint("load").client()
            await loads.wait_for_instances(2, timeout=30)
            body = {
                "model": BUILTIN_MODEL,
                "messages": [{"role": "user", "content": "Talk for a long time"}],
                "max_tokens": 100_000,
                "stream": True,
            }
            gone = 'servegrid_frontend_requests_total{endpoint="/v1/chat/completions",status="499"}'
            assert gone not in _metrics(url)
            async with httpx.AsyncClient(timeout=30) as http:
                async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                    assert response.status_code == 200
                    # Hold the line iterator: an abandoned one is finalized, which closes
                    # the response early (a disconnect of its own, before we looked).
                    lines = response.aiter_lines()
                    events = 0
                    while events < 5:
                        if (await anext(lines)).startswith("data: "):
                            events += 1
                    deadline = time.monotonic() + 30
                    while await _active_requests(runtime) != 1:
                        assert time.monotonic() < deadline, "the request never showed as active"
                        await asyncio.sleep(0.02)
                # leaving the block closes the connection mid-stream
            deadline = time.monotonic() + 30
            while await _active_requests(runtime) != 0:
                assert time.monotonic() < deadline, "the worker kept generating for a gone client"
                await asyncio.sleep(0.05)
            after = await asyncio.to_thread(_metrics, url)
            assert after[gone] == 1  # the frontend saw the client leave mid-stream
            assert after["servegrid_frontend_output_tokens_total"] < 100_000
        finally:
            await runtime.shutdown(drain_timeout=1)


def test_no_workers_is_503_and_unknown_routes_404(tmp_path: Path):
    port = free_port()
    env = {"SERVEGRID_DISCOVERY_DIR": str(tmp_path / "discovery")}
    args = [
        "-f",
        AGG,
        f"--Frontend.port={port}",
        "--Frontend.host=127.0.0.1",
        "--service-name",
        "Frontend,Processor",
    ]
    with serve(args, env=env) as served:
        served.wait_for_output("Frontend ready", timeout=60)
        url = f"http://127.0.0.1:{port}"
        body = {"model": BUILTIN_MODEL, "messages": [{"role": "user", "content": "anyone?"}]}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "no_workers"
        assert httpx.get(f"{url}/v1/nothing", timeout=5).status_code == 404


def test_seed_makes_output_repeatable_and_stop_cuts_it(client: openai.OpenAI):
    def ask(**extra):
        return client.completions.create(
            model=BUILTIN_MODEL, prompt="The river", max_tokens=24, seed=7, **extra
        )

    first, second = ask(), ask()
    text = first.choices[0].text
    assert text == second.choices[0].text, "the same seed gave different outputs"
    words = [w for w in text.split() if len(w) >= 3]
    assert words, text
    stop = words[len(words) // 2]
    cut = ask(stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    assert stop not in cut.choices[0].text
