"""The mocker engine: prefix cache, eviction, batching caps, aborts and limits."""

from __future__ import annotations

import asyncio

import pytest

from servegrid.engines.base import (
    EngineConfigError,
    EngineOutput,
    EngineRequest,
    KvEvent,
    PromptTooLongError,
    SamplingParams,
)
from servegrid.engines.mocker import MockerEngine, create
from servegrid.llm.kv_hash import block_hashes

FAST = {"speedup-ratio": 1000}


def req(rid: str, tokens: list[int], max_tokens: int = 4, **sampling) -> EngineRequest:
    return EngineRequest(rid, tokens, SamplingParams(max_tokens=max_tokens, **sampling))


async def collect(engine: MockerEngine, request: EngineRequest) -> list[EngineOutput]:
    return [out async for out in engine.generate(request)]


def tokens_of(outputs: list[EngineOutput]) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


@pytest.fixture
async def engine_factory():
    engines: list[MockerEngine] = []

    async def make(**config) -> tuple[MockerEngine, list[KvEvent]]:
        events: list[KvEvent] = []
        engine = create({**FAST, **config})
        engine.set_kv_event_sink(events.append)
        await engine.start()
        engines.append(engine)
        return engine, events

    yield make
    for engine in engines:
        await engine.stop()


async def test_generates_max_tokens_and_ends_with_length(engine_factory):
    engine, _ = await engine_factory()
    outputs = await collect(engine, req("a", list(range(3, 40)), max_tokens=7))
    assert len(tokens_of(outputs)) == 7
    assert [o.finish_reason for o in outputs[:-1]] == [None] * (len(outputs) - 1)
    assert outputs[-1].finish_reason == "length"


async def test_repeated_prompt_hits_the_prefix_cache(engine_factory):
    engine, events = await engine_factory(**{"block-size": 16})
    prompt = list(range(100, 150))  # 50 tokens: 3 full blocks
    first = await collect(engine, req("a", prompt))
    second = await collect(engine, req("b", prompt))
    other = await collect(engine, req("c", list(range(500, 550))))
    assert first[0].cached_tokens == 0
    assert second[0].cached_tokens == 48
    assert other[0].cached_tokens == 0
    stored = [h for e in events if e.kind == "stored" for h in e.block_hashes]
    assert block_hashes(prompt, 16) == stored[:3]
    assert events[0].parent_hash is None


async def test_stored_events_chain_parent_hashes_across_decode_blocks(engine_factory):
    engine, events = await engine_factory(**{"block-size": 4})
    outputs = await collect(engine, req("a", list(range(10, 18)), max_tokens=9))
    full = list(range(10, 18)) + tokens_of(outputs)
    # 8 prompt + 9 generated = 17 tokens; the last one is never computed: 4 full blocks.
    expected = block_hashes(full, 4)[:4]
    chain = [h for e in events if e.kind == "stored" for h in e.block_hashes]
    assert chain == expected
    for event in events[1:]:
        assert event.parent_hash == expected[expected.index(event.block_hashes[0]) - 1]


async def test_lru_eviction_under_a_tiny_block_budget_emits_removed_events(engine_factory):
    engine, events = await engine_factory(**{"block-size": 4, "num-gpu-blocks": 8})
    prompt_a = list(range(10, 26))  # 4 full blocks, all cached after the request
    await collect(engine, req("a", prompt_a, max_tokens=1))
    hashes_a = block_hashes(prompt_a, 4)
    assert engine.load_metrics().active_blocks == 0
    assert not [e for e in events if e.kind == "removed"]

    await collect(engine, req("b", list(range(200, 224)), max_tokens=1))  # needs 6 blocks
    removed = [h for e in events if e.kind == "removed" for h in e.block_hashes]
    # A's tail blocks are least recently used: they go first, its head survives.
    assert removed == [hashes_a[3], hashes_a[2]]

    again = await collect(engine, req("a2", prompt_a, max_tokens=1))
    assert again[0].cached_tokens == 8


async def test_batching_respects_max_num_seqs_and_max_num_batched_tokens(engine_factory):
    engine, _ = await engine_factory(
        **{"max-num-seqs": 4, "max-num-batched-tokens": 64, "block-size": 8}
    )
    seen_active: list[int] = []
    seen_waiting: list[int] = []

    async def run(i: int) -> int:
        n = 0
        async for out in engine.generate(req(f"r{i}", [i + 3] * 40, max_tokens=6)):
            metrics = engine.load_metrics()
            seen_active.append(metrics.active_requests)
            seen_waiting.append(metrics.waiting_requests)
            n += len(out.token_ids)
        return n

    counts = await asyncio.wait_for(asyncio.gather(*(run(i) for i in range(10))), 10)
    assert counts == [6] * 10
    assert max(seen_active) <= 4
    assert max(seen_waiting) > 0
    assert engine.max_step_seqs <= 4
    assert engine.max_step_tokens <= 64


async def test_chunked_prefill_splits_a_long_prompt_over_steps(engine_factory):
    engine, _ = await engine_factory(**{"max-num-batched-tokens": 32, "block-size": 8})
    steps_before = engine.steps
    outputs = await collect(engine, req("long", list(range(3, 203)), max_tokens=2))
    assert len(tokens_of(outputs)) == 2
    assert engine.max_step_tokens <= 32
    assert engine.steps - steps_before >= 200 // 32 + 1


async def test_closing_the_stream_aborts_and_frees_blocks(engine_factory):
    engine, _ = await engine_factory(**{"enable-prefix-caching": False})
    stream = engine.generate(req("a", list(range(3, 100)), max_tokens=10_000))
    first = await anext(stream)
    assert first.token_ids
    metrics = engine.load_metrics()
    assert metrics.active_requests == 1 and metrics.active_blocks > 0
    await stream.aclose()
    metrics = engine.load_metrics()
    assert metrics.active_requests == 0
    assert metrics.active_blocks == 0


async def test_preemption_under_block_pressure_still_finishes_every_request(engine_factory):
    engine, _ = await engine_factory(**{"block-size": 4, "num-gpu-blocks": 6})
    reference, _ = await engine_factory(**{"block-size": 4})
    reqs = [req(f"p{i}", [i + 5] * 4, max_tokens=12, seed=i) for i in range(3)]
    results = await asyncio.wait_for(asyncio.gather(*(collect(engine, r) for r in reqs)), 10)
    for r, outputs in zip(reqs, results, strict=True):
        assert outputs[-1].finish_reason == "length"
        # Recomputation after preemption does not change what a sequence generates.
        assert tokens_of(outputs) == tokens_of(await collect(reference, r))
    assert engine.load_metrics().active_blocks == 0


async def test_prompt_longer_than_max_model_len_is_rejected(engine_factory):
    engine, _ = await engine_factory(**{"max-model-len": 64})
    with pytest.raises(PromptTooLongError, match="max-model-len is 64"):
        await collect(engine, req("a", list(range(3, 103))))
    assert engine.load_metrics().waiting_requests == 0


async def test_generation_stops_at_max_model_len(engine_factory):
    engine, _ = await engine_factory(**{"max-model-len": 64})
    outputs = await collect(engine, req("a", list(range(3, 63)), max_tokens=100))
    assert len(tokens_of(outputs)) == 4
    assert outputs[-1].finish_reason == "length"


async def test_output_is_deterministic_per_seed_and_avoids_special_ids(tmp_path, engine_factory):
    from servegrid.llm.model_init import init_model

    model = init_model(tmp_path / "model", vocab_size=300)
    engine, _ = await engine_factory(model=str(model))
    a = tokens_of(await collect(engine, req("a", [5] * 8, max_tokens=200, seed=7)))
    b = tokens_of(await collect(engine, req("b", [9] * 8, max_tokens=200, seed=7)))
    c = tokens_of(await collect(engine, req("c", [9] * 8, max_tokens=200)))
    assert a == b and a != c
    assert all(2 < t < 300 for t in a + c)  # ids 0-2 are the special tokens


async def test_a_sampled_stop_token_ends_with_stop(engine_factory):
    engine, _ = await engine_factory(**{"vocab-size": 8})
    outputs = await collect(engine, req("a", [1, 2, 3], max_tokens=1000, stop_token_ids=[5]))
    produced = tokens_of(outputs)
    assert produced[-1] == 5 and 5 not in produced[:-1]
    assert outputs[-1].finish_reason == "stop"


async def test_stop_finishes_open_streams_with_abort():
    engine = create(FAST)
    await engine.start()
    stream = engine.generate(req("a", [3, 4, 5], max_tokens=10**6))
    await anext(stream)
    await engine.stop()
    tail = [out async for out in stream]
    assert tail[-1].finish_reason == "abort"


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"block-size": "big"}, "block-size"),
        ({"num-gpu-blocks": 0}, "num-gpu-blocks"),
        ({"speedup-ratio": -1}, "speedup-ratio"),
        ({"enable-prefix-caching": "maybe"}, "enable-prefix-caching"),
    ],
)
def test_bad_config_names_the_key(config, key):
    with pytest.raises(EngineConfigError, match=key):
        create(config)


async def test_prefix_hit_tokens_reports_what_the_cache_holds(engine_factory):
    engine, _ = await engine_factory(**{"block-size": 8})
    prompt = list(range(40, 80))
    assert engine.prefix_hit_tokens(prompt) == 0
    await collect(engine, req("a", prompt, max_tokens=1))
    assert engine.prefix_hit_tokens(prompt) == 32  # 39 tokens may hit: 4 full blocks
    assert engine.prefix_hit_tokens(prompt[:20] + [1] * 20) == 16
