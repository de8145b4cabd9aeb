"""configs/agg.yaml and configs/disagg.yaml served with the torch engine on the tiny random
Llama, over HTTP.

The model directory is made by ``servegrid model init`` and chosen with ``--Common.model``,
as a user would; both aggregated workers load it, so repeatable output across requests also
means repeatable across processes (round-robin alternates between them). The disaggregated
graph runs a decode Worker and a PrefillWorker in two processes: the prefill worker computes
each prompt's KV and sends the tensors over the bulk TCP path, and the decode worker goes on
from them; its greedy output must equal the aggregated graph's.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from servegrid.distributed import env as env_names
from servegrid.distributed.embedded_nats import free_port
from servegrid.distributed.runtime import DistributedRuntime
from servegrid.engines.base import EngineOutput, EngineRequest, SamplingParams
from servegrid.llm.model_init import TINY_LORA_NAME, tiny_lora_dir
from tests.support.optional import require_modules
from tests.support.serving import REPO, ServedGraph, serve

require_modules("torch", "transformers", extra="torch")

AGG = str(REPO / "configs" / "agg.yaml")
DISAGG = str(REPO / "configs" / "disagg.yaml")
DISAGG_NAMESPACE = "servegrid"  # the services' default namespace, also set explicitly
WORKER_MAX_LEN = 96  # below the processor's, so the engine's own check is what answers


def wait_listed(url: str, model: str, served: ServedGraph, timeout: float = 60.0) -> None:
    """Until the frontend lists ``model`` (it learns of workers through discovery)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            listed = httpx.get(f"{url}/v1/models", timeout=5).json().get("data", [])
            if any(m.get("id") == model for m in listed):
                return
        except (httpx.HTTPError, ValueError):
            pass
        if served.proc.poll() is not None:
            raise AssertionError(f"servegrid serve exited:\n{served.text()}")
        time.sleep(0.1)
    raise AssertionError(f"{model} not listed by {url}/v1/models in {timeout}s")


AGG_NAMESPACE = "torch-agg-test"


class Graph:
    def __init__(
        self, url: str, model: str, served: ServedGraph, env: dict[str, str] | None = None
    ) -> None:
        self.url = url
        self.model = model
        self.served = served
        self.env = env or {}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    subprocess.run(
        [sys.executable, "-m", "servegrid.cli", "model", "init", str(path)],
        check=True,
        timeout=120,
    )
    return path


@pytest.fixture(scope="module")
def graph(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Graph]:
    port = free_port()
    env = {
        env_names.SERVEGRID_DISCOVERY_DIR: str(tmp_path_factory.mktemp("discovery")),
        env_names.SERVEGRID_NAMESPACE: AGG_NAMESPACE,
    }
    args = ["-f", AGG, f"--Frontend.port={port}", "--Frontend.host=127.0.0.1"]
    args += [
        "--Worker.engine=torch",
        f"--Common.model={model}",
        "--Common.max-model-len=512",
        f"--Worker.max-model-len={WORKER_MAX_LEN}",
        "--Worker.num-gpu-blocks=128",
        "--Worker.device=cpu",
    ]
    with serve(args, env=env) as served:
        # Each worker imports torch and loads the model before it registers.
        served.wait_for_output("Worker ready", timeout=240, count=2)
        served.wait_for_output("Frontend ready", timeout=60)
        wait_listed(f"http://127.0.0.1:{port}", str(model), served)
        yield Graph(f"http://127.0.0.1:{port}", str(model), served, env)


@pytest.fixture
def client(graph: Graph) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{graph.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_model_directory(graph: Graph, client: openai.OpenAI):
    assert [m.id for m in client.models.list().data] == [graph.model]
    assert "engine torch serving model" in graph.served.text()


def test_completion_and_chat_through_the_openai_client(graph: Graph, client: openai.OpenAI):
    reply = client.completions.create(model=graph.model, prompt="Once upon a time", max_tokens=8)
    assert reply.choices[0].text
    assert reply.usage.completion_tokens == 8 and reply.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(
        model=graph.model,
        messages=[{"role": "user", "content": "Tell me about rivers"}],
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 10


def test_greedy_and_seeded_sampling_repeat_on_both_workers(graph: Graph, client: openai.OpenAI):
    def ask(**sampling) -> str:
        reply = client.completions.create(
            model=graph.model, prompt="The river runs", max_tokens=16, **sampling
        )
        return reply.choices[0].text

    # Four of each: round-robin sends two to each worker.
    greedy = {ask(temperature=0.0) for _ in range(4)}
    assert len(greedy) == 1
    seeded = {ask(temperature=1.0, top_p=0.95, seed=11) for _ in range(4)}
    assert len(seeded) == 1
    assert seeded != greedy
    assert ask(temperature=1.0, top_p=0.95, seed=12) not in seeded


def test_concurrent_requests_get_the_tokens_they_get_alone(graph: Graph, client: openai.OpenAI):
    prompts = [f"Story number {i} begins with" + " a long road" * i for i in range(6)]

    def ask(prompt: str) -> str:
        reply = client.completions.create(
            model=graph.model, prompt=prompt, max_tokens=12, temperature=0.0
        )
        return reply.choices[0].text

    serial = [ask(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        concurrent = list(pool.map(ask, prompts))
    assert concurrent == serial


def test_the_engines_max_model_len_is_a_client_error(graph: Graph, client: openai.OpenAI):
    # Fits the processor's 512 but not the worker's 96: the engine itself refuses it.
    body = {"model": graph.model, "prompt": "word " * 150, "max_tokens": 4}
    response = httpx.post(f"{graph.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert f"max-model-len is {WORKER_MAX_LEN}" in response.json()["error"]["message"]
    # and the worker keeps serving
    ok = client.completions.create(model=graph.model, prompt="still there?", max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_a_model_directory_without_weights_is_one_clear_line(tmp_path: Path):
    model = tmp_path / "no-weights"
    subprocess.run(
        [sys.executable, "-m", "servegrid.cli", "model", "init", "--no-weights", str(model)],
        check=True,
        timeout=120,
    )
    port = free_port()
    env = {"SERVEGRID_DISCOVERY_DIR": str(tmp_path / "discovery")}
    args = ["-f", AGG, f"--Frontend.port={port}", "--Frontend.host=127.0.0.1"]
    args += ["--Worker.engine=torch", f"--Common.model={model}", "--Worker.ServiceArgs.workers=1"]
    with serve(args, env=env) as served:
        served.proc.wait(timeout=180)
    text = served.text()
    assert f"{model} has no weights" in text and "servegrid model init --force" in text
    assert "Traceback" not in text


# -- disaggregated: configs/disagg.yaml, prefill and decode in two processes --------------


DisaggGraph = Graph


@pytest.fixture(scope="module")
def disagg(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DisaggGraph]:
    port = free_port()
    env = {
        env_names.SERVEGRID_DISCOVERY_DIR: str(tmp_path_factory.mktemp("disagg-discovery")),
        env_names.SERVEGRID_NAMESPACE: DISAGG_NAMESPACE,
    }
    args = ["-f", DISAGG, f"--Frontend.port={port}", "--Frontend.host=127.0.0.1"]
    args += [
        "--Worker.engine=torch",
        "--PrefillWorker.engine=torch",
        f"--Common.model={model}",
        "--Common.max-model-len=512",
        # Every test prompt is longer: all of them are prefilled by the PrefillWorker.
        "--Worker.max-local-prefill-length=8",
        "--Worker.num-gpu-blocks=128",
        "--PrefillWorker.num-gpu-blocks=128",
    ]
    with serve(args, env=env) as served:
        served.wait_for_output("PrefillWorker ready", timeout=240)
        served.wait_for_output("Worker ready", timeout=240)
        served.wait_for_output("Frontend ready", timeout=60)
        wait_listed(f"http://127.0.0.1:{port}", str(model), served)
        yield DisaggGraph(f"http://127.0.0.1:{port}", str(model), served, env)


async def disagg_state(graph: DisaggGraph) -> tuple[dict, list[dict]]:
    """The decode Worker's ``disagg_stats`` and the PrefillWorker's ``status``."""
    runtime = await DistributedRuntime.from_env()
    try:
        stats_client = await runtime.client(DISAGG_NAMESPACE, "Worker", "disagg_stats")
        await stats_client.wait_for_instances(1, timeout=30)
        stats = await (await stats_client.round_robin(None)).single()
        status_client = await runtime.client(DISAGG_NAMESPACE, "PrefillWorker", "status")
        ids = await status_client.wait_for_instances(1, timeout=30)
        statuses = [await (await status_client.direct(None, i)).single() for i in ids]
        return stats, statuses
    finally:
        await runtime.shutdown(drain_timeout=0)


def test_disaggregated_greedy_output_equals_aggregated_and_kv_bytes_cross(
    graph: Graph, disagg: DisaggGraph, monkeypatch: pytest.MonkeyPatch
):
    prompts = [
        "The lighthouse keeper counted the ships that passed in the night",
        "Rivers carry stones to the sea, one grain at a time, for ever",
        "A short one, but still longer than eight tokens",
    ]

    def ask(url: str, prompt: str) -> str:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.completions.create(
            model=graph.model, prompt=prompt, max_tokens=12, temperature=0.0
        )
        assert reply.usage.completion_tokens == 12
        return reply.choices[0].text

    aggregated = [ask(graph.url, p) for p in prompts]
    disaggregated = [ask(disagg.url, p) for p in prompts]
    assert disaggregated == aggregated

    for key, value in disagg.env.items():
        monkeypatch.setenv(key, value)
    stats, statuses = asyncio.run(disagg_state(disagg))
    # Every prompt was prefilled in the PrefillWorker's process and its KV shipped whole.
    assert stats["decisions"].get("remote", 0) == len(prompts), stats
    assert stats["transfers_received"] == len(prompts)
    sent = [h for status in statuses for h in status["handled"] if h["outcome"] == "sent"]
    assert len(sent) == len(prompts)
    assert stats["bytes_received"] == sum(h["logical_bytes"] for h in sent) > 0
    # 4 layers x K,V x 4 KV heads x 32 x float32 = 4 KiB a token, in whole 16-token blocks
    assert all(h["logical_bytes"] % (16 * 4096) == 0 for h in sent)


# -- LoRA through the Worker's endpoints ---------------------------------------------------


async def lora_round(graph: Graph, model: Path) -> tuple[list[dict], list[list[int]]]:
    """Load the tiny adapter on every worker, then generate with and without it on each."""
    runtime = await DistributedRuntime.from_env()
    try:
        loader = await runtime.client(AGG_NAMESPACE, "Worker", "load_lora")
        ids = await loader.wait_for_instances(2, timeout=30)
        adapter = {"name": TINY_LORA_NAME, "path": str(tiny_lora_dir(model))}
        answers = [await (await loader.direct(adapter, i)).single() for i in ids]
        generate = await runtime.client(AGG_NAMESPACE, "Worker", "generate")
        await generate.wait_for_instances(2, timeout=30)
        prompt = list(range(300, 340))
        outputs = []
        for i in ids:
            for lora in (None, TINY_LORA_NAME):
                request = EngineRequest(
                    f"lora-{i}-{lora}", prompt, SamplingParams(max_tokens=8), lora_name=lora
                )
                stream = await generate.direct(request, i, EngineOutput)
                outputs.append([t async for out in stream for t in out.token_ids])
        return answers, outputs
    finally:
        await runtime.shutdown(drain_timeout=0)


def test_a_lora_adapter_loaded_at_run_time_changes_what_workers_generate(
    graph: Graph, model: Path, monkeypatch: pytest.MonkeyPatch
):
    for key, value in graph.env.items():
        monkeypatch.setenv(key, value)
    answers, outputs = asyncio.run(lora_round(graph, model))
    assert answers == [{"lora_adapters": [TINY_LORA_NAME]}] * 2
    base_0, lora_0, base_1, lora_1 = outputs
    assert base_0 == base_1 and lora_0 == lora_1  # the same on both worker processes
    assert lora_0 != base_0
