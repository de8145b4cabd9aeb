"""LoRA adapters below the HTTP edge: config, the mocker's simulation, salted KV blocks and
adapter-aware routing in every router mode."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from servegrid.components.router import AdapterNotHeldError, WorkerPicker
from servegrid.distributed.discovery.base import InstanceInfo
from servegrid.engines.base import (
    EngineConfigError,
    EngineRequest,
    EngineRequestError,
    KvEvent,
    SamplingParams,
)
from servegrid.engines.lora import adapters_from_config, holders
from servegrid.engines.mocker import create
from servegrid.errors import ModelNotFoundError, NoWorkersError
from servegrid.kv_router.config import KvRouterConfig
from servegrid.kv_router.router import KvRouter
from servegrid.llm.kv_hash import block_hashes
from servegrid.llm.protocol import RouteRequest

BS = 4
A, B, C = 0xA, 0xB, 0xC
PROMPT = list(range(1, 4 * BS + 2))  # four full blocks and one more token


def mocker(**config) -> object:
    return create({"block-size": BS, "speedup-ratio": 1000.0, "vocab-size": 500, **config})


async def run(engine, prompt: list[int], lora: str | None = None, seed: int = 7) -> list[int]:
    request = EngineRequest("r", prompt, SamplingParams(max_tokens=6, seed=seed), lora)
    out: list[int] = []
    async for chunk in engine.generate(request):
        out.extend(chunk.token_ids)
    return out


# -- config ----------------------------------------------------------------------------------


def test_lora_adapters_config_is_a_mapping_of_names_to_paths():
    assert adapters_from_config({}, "Worker") == {}
    config = {"lora-adapters": {"sql": "/models/sql", 7: "/models/seven"}}
    assert adapters_from_config(config, "Worker") == {"sql": "/models/sql", "7": "/models/seven"}
    with pytest.raises(EngineConfigError, match="Worker: lora-adapters must map"):
        adapters_from_config({"lora-adapters": ["/models/sql"]}, "Worker")
    with pytest.raises(EngineConfigError, match="'sql' needs the path"):
        adapters_from_config({"lora-adapters": {"sql": None}}, "Worker")


# -- the mocker ------------------------------------------------------------------------------


async def test_mocker_loads_configured_adapters_at_start_and_more_at_run_time():
    engine = mocker(**{"lora-adapters": {"sql": "/a/sql"}, "lora-load-seconds": 0})
    assert engine.lora_names() == []
    await engine.start()
    assert engine.lora_names() == ["sql"]
    await engine.load_lora("chat", "/a/chat")
    await engine.load_lora("chat", "/a/chat")  # the same again: nothing to do
    assert engine.lora_names() == ["chat", "sql"]
    with pytest.raises(EngineConfigError, match="already loaded from /a/chat"):
        await engine.load_lora("chat", "/elsewhere")
    await engine.stop()


async def test_an_adapter_changes_the_mockers_output_the_same_way_on_every_worker():
    one, two = mocker(), mocker()
    for engine in (one, two):
        await engine.load_lora("sql", "/a/sql")
        await engine.load_lora("chat", "/a/chat")
    base = await run(one, PROMPT)
    sql = await run(one, PROMPT, "sql")
    assert sql != base and await run(one, PROMPT, "chat") not in (base, sql)
    assert await run(two, PROMPT, "sql") == sql and await run(two, PROMPT) == base
    for engine in (one, two):
        await engine.stop()


async def test_a_request_for_an_adapter_the_worker_lacks_is_refused():
    engine = mocker()
    with pytest.raises(EngineRequestError, match="adapter 'sql' is not loaded"):
        await run(engine, PROMPT, "sql")
    await engine.stop()


async def test_an_adapters_kv_blocks_are_salted_and_never_shared_with_the_base_model():
    engine = mocker()
    await engine.load_lora("sql", "/a/sql")
    events: list[KvEvent] = []
    engine.set_kv_event_sink(events.append)

    async def cached_tokens(lora: str | None) -> int:
        request = EngineRequest("r", PROMPT, SamplingParams(max_tokens=1), lora)
        async for chunk in engine.generate(request):
            return chunk.cached_tokens
        raise AssertionError("no output")

    assert await cached_tokens(None) == 0
    assert await cached_tokens("sql") == 0  # the base model's blocks are no hit for it
    assert await cached_tokens("sql") == 4 * BS  # its own are
    stored = [h for e in events if e.kind == "stored" for h in e.block_hashes]
    base, salted = block_hashes(PROMPT, BS), block_hashes(PROMPT, BS, salt="sql")
    assert not set(base) & set(salted)
    assert set(base) | set(salted) == set(stored)  # the router's hashes are the engine's
    await engine.stop()


async def test_a_block_filled_while_decoding_for_an_adapter_is_salted_too():
    engine = mocker()
    await engine.load_lora("sql", "/a/sql")
    events: list[KvEvent] = []
    engine.set_kv_event_sink(events.append)
    short = [1, 2]  # no full block until decoding fills one
    generated = await run(engine, short, "sql")
    stored = [h for e in events if e.kind == "stored" for h in e.block_hashes]
    assert stored == block_hashes(short + generated, BS, salt="sql")[:1]
    await engine.stop()


# -- routing ---------------------------------------------------------------------------------


class Workers:
    """What an endpoint client knows: live workers and their discovery metadata."""

    def __init__(self, adapters: dict[int, list[str]]) -> None:
        self.infos = [
            InstanceInfo("ns", "Worker", "generate", w, "127.0.0.1", 1, {"lora_adapters": a})
            for w, a in adapters.items()
        ]

    def instance_ids(self) -> list[int]:
        return [i.instance_id for i in self.infos]

    def instances(self) -> list[InstanceInfo]:
        return list(self.infos)

    async def wait_for_instances(self, count: int = 1, timeout: float = 30.0) -> list[int]:
        raise AssertionError("workers are in view: nothing to wait for")


def test_holders_are_the_workers_whose_metadata_lists_the_adapter():
    workers = Workers({A: ["sql"], B: [], C: ["sql", "chat"]})
    assert holders(workers.instances(), "sql") == [A, C]
    assert holders(workers.instances(), "chat") == [C]
    assert holders(workers.instances(), "none") == []


@pytest.mark.parametrize("mode", ["random", "round-robin"])
def test_random_and_round_robin_send_adapter_requests_only_to_holders(mode):
    picker = WorkerPicker(mode)
    workers = Workers({A: ["sql"], B: [], C: ["sql"]})
    chosen = Counter(
        picker.route(RouteRequest([1, 2], f"r{i}", "sql"), workers).worker_id for i in range(40)
    )
    assert set(chosen) == {A, C}
    base = {picker.route(RouteRequest([1, 2], f"b{i}"), workers).worker_id for i in range(40)}
    assert base == {A, B, C}  # every worker serves the base model


def test_an_adapter_no_worker_holds_is_model_not_found():
    picker = WorkerPicker("round-robin")
    with pytest.raises(ModelNotFoundError, match="no worker holds LoRA adapter 'sql'"):
        picker.route(RouteRequest([1], "r", "sql"), Workers({A: [], B: ["chat"]}))
    with pytest.raises(NoWorkersError):  # no worker at all: that is another answer
        picker.route(RouteRequest([1], "r", "sql"), Workers({}))


async def test_a_request_for_an_adapter_waits_briefly_for_a_worker_to_announce_it(monkeypatch):
    monkeypatch.setattr("servegrid.components.router.ADAPTER_WAIT_S", 0.2)
    picker = WorkerPicker("random")
    workers = Workers({A: [], B: []})
    with pytest.raises(AdapterNotHeldError):
        await picker.route_live(RouteRequest([1], "r", "sql"), workers)
    workers.infos[1] = InstanceInfo(
        "ns", "Worker", "generate", B, "127.0.0.1", 1, {"lora_adapters": ["sql"]}
    )
    answer = await picker.route_live(RouteRequest([1], "r", "sql"), workers)
    assert answer.worker_id == B


def kv_picker() -> WorkerPicker:
    picker = WorkerPicker("kv", {"block-size": BS})
    picker.kv = KvRouter(
        KvRouterConfig(block_size=BS, router_temperature=0.0), None, rng=random.Random(1)
    )
    return picker


def test_kv_router_sends_an_adapter_request_to_a_holder_even_if_another_caches_its_tokens():
    picker = kv_picker()
    assert picker.kv is not None
    workers = Workers({A: [], B: ["sql"]})
    # A holds the prompt's blocks for the base model: a base request goes there...
    picker.kv.indexer.store(A, block_hashes(PROMPT, BS))
    assert picker.route(RouteRequest(PROMPT, "base"), workers).worker_id == A
    # ...but those blocks are no use to the adapter, and only B holds the adapter.
    answer = picker.route(RouteRequest(PROMPT, "sql", "sql"), workers)
    assert (answer.worker_id, answer.overlap_blocks) == (B, 0)
    # A is still a member of the router's view: routing among holders forgets no one.
    assert picker.kv.state()["workers"][f"{A:x}"]["member"]


def test_kv_router_finds_an_adapters_cached_blocks_by_their_salted_hashes():
    picker = kv_picker()
    assert picker.kv is not None
    workers = Workers({A: ["sql"], B: ["sql"], C: ["sql"]})
    picker.kv.indexer.store(C, block_hashes(PROMPT, BS, salt="sql"))
    answer = picker.route(RouteRequest(PROMPT, "r", "sql"), workers)
    assert (answer.worker_id, answer.overlap_blocks) == (C, 4)
    base = picker.route(RouteRequest(PROMPT, "b"), workers)
    assert base.overlap_blocks == 0  # the adapter's blocks are no hit for the base model


async def test_disaggregated_workers_prefill_adapter_requests_locally():
    from servegrid.components.remote_prefill import DisaggSettings, RemotePrefill

    engine = mocker()
    await engine.load_lora("sql", "/a/sql")
    # A prompt far over max-local-prefill-length would go to the prefill queue; with an
    # adapter it stays here (prefill workers do not load adapters), with no queue touched.
    remote = RemotePrefill(engine, DisaggSettings(max_local_prefill_length=1), ("ns", "Prefill"))
    request = EngineRequest("r", PROMPT, SamplingParams(max_tokens=3, seed=7), "sql")
    out = [t async for chunk in remote.generate(request) for t in chunk.token_ids]
    assert len(out) == 3
    assert remote.snapshot()["decisions"] == {"local_lora": 1}
    await engine.stop()
