"""Streaming chat requests against a served graph, for lifecycle tests: start many, see each
one's first token, and collect what each received (text, finish, usage, or an error event)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from servegrid.distributed.discovery.base import KEY_ROOT, InstanceInfo
from servegrid.distributed.discovery.file import FileDiscovery
from servegrid.llm.model_init import BUILTIN_MODEL
from tests.support.serving import ServedGraph


@dataclass
class StreamResult:
    started: asyncio.Event = field(default_factory=asyncio.Event)
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    error: dict | None = None
    failure: str = ""  # the client side broke (connection closed, bad status)

    @property
    def complete(self) -> bool:
        return self.finish_reason is not None and self.error is None and not self.failure


def chat_body(seed: int, max_tokens: int, stream: bool = True) -> dict:
    body = {
        "model": BUILTIN_MODEL,
        "messages": [{"role": "user", "content": f"Tell story number {seed}"}],
        "max_tokens": max_tokens,
        "seed": seed,
        "temperature": 0,
        "ignore_eos": True,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


async def stream_chat(
    http: httpx.AsyncClient, url: str, body: dict, result: StreamResult
) -> StreamResult:
    """Run one streaming request to its end, recording what arrived into ``result``."""
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                result.failure = f"status {response.status_code}: {await response.aread()!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = event["error"]
                    continue
                if event.get("usage"):
                    result.completion_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    result.text += choice["delta"].get("content") or ""
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
                    if result.text:
                        result.started.set()
    except httpx.HTTPError as exc:
        result.failure = f"{type(exc).__name__}: {exc}"
    finally:
        result.started.set()  # never leave a waiter hanging
    return result


async def start_streams(
    http: httpx.AsyncClient, url: str, bodies: list[dict], timeout: float = 60.0
) -> tuple[list[StreamResult], list[asyncio.Task]]:
    """Start every request and return once each has received its first text."""
    results = [StreamResult() for _ in bodies]
    tasks = [
        asyncio.create_task(stream_chat(http, url, body, result))
        for body, result in zip(bodies, results, strict=True)
    ]
    await asyncio.wait_for(asyncio.gather(*(r.started.wait() for r in results)), timeout)
    not_started = [r.failure or r.error for r in results if not r.text]
    assert not not_started, f"some streams failed before their first token: {not_started}"
    return results, tasks


def wait_models(url: str, served: ServedGraph, timeout: float = 90.0) -> None:
    """Until ``/v1/models`` lists the built-in model (a worker registered)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served.proc.poll() is not None:
            raise AssertionError(f"servegrid serve exited:\n{served.text()}")
        try:
            models = httpx.get(f"{url}/v1/models", timeout=2).json()["data"]
            if [m["id"] for m in models] == [BUILTIN_MODEL]:
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} lists no model after {timeout}s:\n{served.text()}")


def namespace_of(served: ServedGraph) -> str:
    """The namespace ``servegrid serve`` said the graph runs in."""
    served.wait_for_output("] namespace ", timeout=30)
    for line in served.output:
        if "] namespace " in line:
            return line.split("] namespace ", 1)[1].split()[0].rstrip(",")
    raise AssertionError(served.text())


async def worker_loads(discovery_dir: Path) -> dict[int, int]:
    """Active requests of every registered Worker in any namespace, by the worker's pid."""
    from servegrid.distributed.runtime import DistributedRuntime

    runtime = DistributedRuntime(FileDiscovery(discovery_dir))
    try:
        entries: list[InstanceInfo] = await runtime.discovery.list(f"{KEY_ROOT}/")
        loads: dict[int, int] = {}
        for info in entries:
            if (info.component, info.endpoint) != ("Worker", "load"):
                continue
            client = await runtime.client(info.namespace, "Worker", "load")
            answer = await (await client.direct(None, info.instance_id)).single()
            loads[info.metadata["pid"]] = answer["active_requests"]
        return loads
    finally:
        await runtime.shutdown(drain_timeout=0)
