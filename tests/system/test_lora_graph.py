"""LoRA adapters served as a user serves them: configs/agg.yaml with ``lora-adapters`` on the
mocker, the OpenAI client's view (/v1/models, requests naming an adapter), and an operator
loading another adapter on one of the two workers with ``servegrid lora load``."""

from __future__ import annotations

import json
import re
import subprocess
import time

import httpx
import pytest

from servegrid.distributed.embedded_nats import free_port
from servegrid.llm.model_init import BUILTIN_MODEL
from tests.support.serving import REPO, SERVEGRID, ServedGraph, serve
from tests.support.streams import namespace_of

AGG = str(REPO / "configs" / "agg.yaml")
REQUESTS = 8


def chat(model: str, n: int) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"Question {n}: where is parcel {n * 7}?"}],
        "max_tokens": 8,
        "seed": n,
        "temperature": 0,
        "ignore_eos": True,
    }


def routed(metrics: str) -> dict[str, float]:
    """``servegrid_frontend_routed_requests_total`` by worker (hex id)."""
    pattern = r'servegrid_frontend_routed_requests_total\{worker="([0-9a-f]+)"\} (\S+)'
    return {w: float(v) for w, v in re.findall(pattern, metrics)}


def model_cards(url: str) -> dict[str, str | None]:
    """Listed model id -> its parent (None for a base model)."""
    data = httpx.get(f"{url}/v1/models", timeout=5).json()["data"]
    return {m["id"]: m.get("parent") for m in data}


def wait_listed(url: str, served: ServedGraph, wanted: dict, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    seen: dict = {}
    while time.monotonic() < deadline:
        if served.proc.poll() is not None:
            raise AssertionError(f"servegrid serve exited:\n{served.text()}")
        try:
            seen = model_cards(url)
            if seen == wanted:
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"/v1/models lists {seen}, not {wanted}, after {timeout}s")


def lora_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SERVEGRID, "lora", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """configs/agg.yaml (two mocker workers) with the adapter ``sql`` on both, KV routing."""
    import os

    port = free_port()
    env = {
        **os.environ,
        "SERVEGRID_DISCOVERY_DIR": str(tmp_path_factory.mktemp("lora") / "discovery"),
    }
    args = ["-f", AGG, f"--Frontend.port={port}", "--Frontend.host=127.0.0.1"]
    args += ["--Processor.router=kv", "--Worker.speedup-ratio=50"]
    args += ["--Worker.lora-adapters={sql: /srv/adapters/sql}"]
    with serve(args, env=env) as served:
        url = f"http://127.0.0.1:{port}"
        wait_listed(url, served, {BUILTIN_MODEL: None, "sql": BUILTIN_MODEL})
        yield url, served, env


def test_a_request_naming_an_adapter_runs_with_it(graph):
    url, _, _ = graph
    replies = {}
    for model in (BUILTIN_MODEL, "sql", "sql"):
        reply = httpx.post(f"{url}/v1/chat/completions", json=chat(model, 1), timeout=30)
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == model
        replies.setdefault(model, []).append(reply.json()["choices"][0]["message"]["content"])
    base, (sql, sql_again) = replies[BUILTIN_MODEL][0], replies["sql"]
    assert sql and sql == sql_again  # greedy and seeded: the same answer twice
    assert sql != base  # the adapter changes what the model says


def test_an_unknown_model_is_404_model_not_found(graph):
    url, _, _ = graph
    reply = httpx.post(f"{url}/v1/chat/completions", json=chat("no-such-adapter", 1), timeout=30)
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "model_not_found"


def test_an_adapter_loaded_at_run_time_is_served_only_by_the_worker_holding_it(graph):
    url, served, env = graph
    namespace = namespace_of(served)
    listing = lora_cli(env, "list", "--namespace", namespace, "--json")
    assert listing.returncode == 0, listing.stderr
    workers = json.loads(listing.stdout)
    assert [w["lora_adapters"] for w in workers] == [["sql"], ["sql"]]
    holder, other = workers[0]["worker"], workers[1]["worker"]

    loaded = lora_cli(env, "load", "chat", "/srv/adapters/chat", "-n", namespace, "-w", holder)
    assert loaded.returncode == 0, loaded.stderr
    assert f"worker {holder}: loaded chat (adapters: chat, sql)" in loaded.stdout
    # No restart: the frontend learns it from the worker's discovery metadata.
    wanted = {BUILTIN_MODEL: None, "chat": BUILTIN_MODEL, "sql": BUILTIN_MODEL}
    wait_listed(url, served, wanted, timeout=30)

    before = routed(httpx.get(f"{url}/metrics", timeout=5).text)
    texts = []
    for n in range(REQUESTS):
        reply = httpx.post(f"{url}/v1/chat/completions", json=chat("chat", n), timeout=30)
        assert reply.status_code == 200, reply.text
        texts.append(reply.json()["choices"][0]["message"]["content"])
    after = routed(httpx.get(f"{url}/metrics", timeout=5).text)
    assert after.get(holder, 0) - before.get(holder, 0) == REQUESTS
    assert after.get(other, 0) == before.get(other, 0)  # never the worker without it
    assert all(texts)

    # The same name from another path is refused, and says where it came from.
    clash = lora_cli(env, "load", "chat", "/srv/other", "-n", namespace, "-w", holder)
    assert clash.returncode == 1
    assert "already loaded from /srv/adapters/chat" in clash.stderr
    unknown = lora_cli(env, "load", "x", "/srv/x", "-n", namespace, "-w", "abc123")
    assert unknown.returncode == 2 and "no such worker: abc123" in unknown.stderr
