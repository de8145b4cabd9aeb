"""The torch engine on the tiny random Llama, in process: what it generates and what it caches.

One engine (and one model load) serves the whole module; every test leaves it idle.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.support.optional import require_modules

require_modules("torch", "transformers", extra="torch")

import torch  # noqa: E402

from servegrid.engines.base import (  # noqa: E402
    EngineOutput,
    EngineRequest,
    EngineRequestError,
    KvEvent,
    PromptTooLongError,
    SamplingParams,
)
from servegrid.engines.registry import create_engine  # noqa: E402
from servegrid.engines.torch import TorchEngine  # noqa: E402
from servegrid.llm.kv_hash import block_hashes  # noqa: E402
from servegrid.llm.model_init import TINY_LORA_NAME, init_model, tiny_lora_dir  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="module")

BLOCK = 16
MAX_LEN = 160
PROMPTS = [
    list(range(40, 77)),  # 37 tokens: two full blocks and a partial one
    [5, 6, 7],
    list(range(300, 320)),
    list(range(1000, 1051)),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_dir: Path) -> AsyncIterator[TorchEngine]:
    eng = create_engine(
        "torch",
        {
            "model": str(model_dir),
            "device": "cpu",
            "block-size": BLOCK,
            "num-gpu-blocks": 64,
            "max-model-len": MAX_LEN,
            # Small enough that the longest prompt is prefilled in two chunks.
            "max-num-batched-tokens": 32,
            "lora-adapters": {TINY_LORA_NAME: str(tiny_lora_dir(model_dir))},
        },
    )
    assert isinstance(eng, TorchEngine)
    events: list[KvEvent] = []
    eng.set_kv_event_sink(events.append)
    eng.events = events  # type: ignore[attr-defined]
    await eng.start()
    yield eng
    await eng.stop()


@pytest.fixture(scope="module")
def hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None
        )
    return out[0, len(prompt) :].tolist()


async def collect(
    engine: TorchEngine, request: EngineRequest
) -> tuple[list[int], list[EngineOutput]]:
    outputs = [o async for o in engine.generate(request)]
    return [t for o in outputs for t in o.token_ids], outputs


def greedy(rid: str, prompt: list[int], n: int = 12, **kw) -> EngineRequest:
    return EngineRequest(rid, prompt, SamplingParams(max_tokens=n, temperature=0.0, **kw))


async def test_greedy_tokens_equal_transformers_generate(engine: TorchEngine, hf_model):
    # The paged cache, chunked prefill (51 tokens in chunks of 32) and the engine's own
    # forward batching reproduce what transformers' generate() makes with its own cache.
    for i, prompt in enumerate(PROMPTS):
        tokens, outputs = await collect(engine, greedy(f"ref-{i}", prompt))
        assert tokens == hf_greedy(hf_model, prompt, 12), f"prompt {i}"
        assert outputs[-1].finish_reason == "length"


async def test_concurrent_requests_are_batched_and_match_serial(engine: TorchEngine):
    serial = [
        (await collect(engine, greedy(f"serial-{i}", p, 16)))[0] for i, p in enumerate(PROMPTS)
    ]
    engine.max_batch_rows = 0
    results = await asyncio.gather(
        *(collect(engine, greedy(f"batch-{i}", p, 16)) for i, p in enumerate(PROMPTS))
    )
    assert [tokens for tokens, _ in results] == serial
    assert engine.max_batch_rows == len(PROMPTS)  # all four decoded in one forward pass


async def test_seeded_sampling_repeats_and_differs_by_seed(engine: TorchEngine):
    def sampled(rid: str, seed: int) -> EngineRequest:
        params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=seed)
        return EngineRequest(rid, PROMPTS[0], params)

    first, _ = await collect(engine, sampled("s1", 7))
    again, _ = await collect(engine, sampled("s2", 7))
    other, _ = await collect(engine, sampled("s3", 8))
    greedy_tokens, _ = await collect(engine, greedy("g", PROMPTS[0], 24))
    assert first == again
    assert first != other
    assert first != greedy_tokens
    # Batched with other requests, a seeded request still draws the same tokens.
    together = await asyncio.gather(
        collect(engine, sampled("s4", 7)), collect(engine, greedy("g2", PROMPTS[2], 24))
    )
    assert together[0][0] == first


async def test_top_p_near_zero_is_greedy(engine: TorchEngine):
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-6, seed=3)
    tokens, _ = await collect(engine, EngineRequest("tp", PROMPTS[1], params))
    assert tokens == (await collect(engine, greedy("tp-g", PROMPTS[1], 10)))[0]


async def test_prefix_reuse_by_block_hash_and_kv_events(engine: TorchEngine):
    prompt = list(range(500, 540))  # 40 tokens: two full blocks
    engine.events.clear()
    first, outs1 = await collect(engine, greedy("p1", prompt, 4))
    assert outs1[0].cached_tokens == 0
    # The prompt's full blocks were stored under the hashes the KV router computes.
    stored = [h for e in engine.events if e.kind == "stored" for h in e.block_hashes]
    assert stored[:2] == block_hashes(prompt, BLOCK)
    assert set(block_hashes(prompt, BLOCK)) <= set(engine.cached_block_hashes())
    assert engine.prefix_hit_tokens(prompt) == 32
    before = engine.prefill_tokens
    second, outs2 = await collect(engine, greedy("p2", prompt, 4))
    assert outs2[0].cached_tokens == 32
    assert engine.prefill_tokens - before == len(prompt) - 32  # only the tail computed
    assert second == first


async def test_eviction_reports_removed_blocks(model_dir: Path):
    eng = create_engine(
        "torch", {"model": str(model_dir), "device": "cpu", "num-gpu-blocks": 4, "block-size": 8}
    )
    events: list[KvEvent] = []
    eng.set_kv_event_sink(events.append)
    await eng.start()
    try:
        a, b = list(range(10, 27)), list(range(60, 77))  # two full blocks each
        await collect(eng, greedy("e1", a, 2))
        await collect(eng, greedy("e2", b, 2))
        removed = [h for e in events if e.kind == "removed" for h in e.block_hashes]
        assert set(removed) & set(block_hashes(a, 8))
        assert eng.load_metrics().active_blocks == 0
    finally:
        await eng.stop()


async def test_max_model_len_is_enforced(engine: TorchEngine):
    with pytest.raises(PromptTooLongError, match="max-model-len is 160"):
        engine.generate(greedy("long", list(range(MAX_LEN)), 1))
    prompt = list(range(100, 100 + MAX_LEN - 5))
    tokens, outputs = await collect(engine, greedy("edge", prompt, 50))
    assert len(tokens) == 5 and outputs[-1].finish_reason == "length"


async def test_stop_token_ends_with_stop(engine: TorchEngine):
    expected, _ = await collect(engine, greedy("nostop", PROMPTS[2], 8))
    stop_at = next(i for i, t in enumerate(expected) if t not in expected[:i])
    tokens, outputs = await collect(
        engine, greedy("stop", PROMPTS[2], 8, stop_token_ids=[expected[stop_at]])
    )
    assert tokens == expected[: stop_at + 1]
    assert outputs[-1].finish_reason == "stop"


async def test_bad_requests_are_client_errors(engine: TorchEngine):
    with pytest.raises(EngineRequestError, match="outside the model's vocabulary"):
        engine.generate(greedy("oov", [1, 2, 999_999]))
    with pytest.raises(EngineRequestError, match="prompt is empty"):
        engine.generate(greedy("empty", []))


async def test_closing_the_stream_frees_the_sequence(engine: TorchEngine):
    stream = engine.generate(greedy("gone", PROMPTS[3], 100))
    first = await anext(stream)
    assert first.token_ids
    await stream.aclose()
    # The step in flight (if any) ends, then nothing holds blocks or runs.
    for _ in range(200):
        if engine.load_metrics().active_requests == 0 and engine.load_metrics().active_blocks == 0:
            break
        await asyncio.sleep(0.01)
    metrics = engine.load_metrics()
    assert metrics.active_requests == 0 and metrics.active_blocks == 0


async def test_forward_passes_run_off_the_event_loop(engine: TorchEngine, monkeypatch):
    threads: list[str] = []
    run = engine.runner.run

    def recording_run(batches):
        threads.append(threading.current_thread().name)
        return run(batches)

    monkeypatch.setattr(engine.runner, "run", recording_run)
    await collect(engine, greedy("thread", PROMPTS[1], 3))
    assert threads and all(name.startswith("torch-engine") for name in threads)
    assert threading.current_thread().name not in threads


# -- LoRA adapters -----------------------------------------------------------------------


def with_lora(rid: str, prompt: list[int], lora: str | None, n: int = 12) -> EngineRequest:
    return EngineRequest(rid, prompt, SamplingParams(max_tokens=n), lora_name=lora)


async def test_a_lora_adapter_changes_the_output_and_leaves_the_base_alone(engine: TorchEngine):
    assert engine.lora_names() == [TINY_LORA_NAME]
    base, _ = await collect(engine, with_lora("l-base", PROMPTS[0], None))
    adapted, _ = await collect(engine, with_lora("l-a", PROMPTS[0], TINY_LORA_NAME))
    again, _ = await collect(engine, with_lora("l-b", PROMPTS[0], TINY_LORA_NAME))
    assert adapted != base
    assert adapted == again
    assert (await collect(engine, with_lora("l-base2", PROMPTS[0], None)))[0] == base


async def test_caches_of_different_adapters_never_mix(engine: TorchEngine):
    prompt = list(range(700, 740))  # two full blocks
    engine.events.clear()
    _, base_out = await collect(engine, with_lora("c-base", prompt, None, 2))
    _, lora_out = await collect(engine, with_lora("c-lora", prompt, TINY_LORA_NAME, 2))
    assert base_out[0].cached_tokens == 0
    assert lora_out[0].cached_tokens == 0  # the base's blocks of the same prompt are not reused
    salted = block_hashes(prompt, BLOCK, salt=TINY_LORA_NAME)
    stored = [h for e in engine.events if e.kind == "stored" for h in e.block_hashes]
    assert set(salted) <= set(stored) and not set(salted) & set(block_hashes(prompt, BLOCK))
    _, lora_again = await collect(engine, with_lora("c-lora2", prompt, TINY_LORA_NAME, 2))
    assert lora_again[0].cached_tokens == 32


async def test_mixed_adapter_requests_batch_like_serial(engine: TorchEngine):
    requests = [
        with_lora(f"m{i}", p, TINY_LORA_NAME if i % 2 else None) for i, p in enumerate(PROMPTS)
    ]
    serial = [(await collect(engine, r))[0] for r in requests]
    again = [with_lora(f"m2-{i}", r.token_ids, r.lora_name) for i, r in enumerate(requests)]
    together = await asyncio.gather(*(collect(engine, r) for r in again))
    assert [t for t, _ in together] == serial


async def test_adapters_load_at_run_time_and_unknown_ones_are_client_errors(
    engine: TorchEngine, model_dir: Path
):
    with pytest.raises(EngineRequestError, match="'other' is not loaded"):
        engine.generate(with_lora("u", PROMPTS[1], "other"))
    await engine.load_lora("other", str(tiny_lora_dir(model_dir)))
    assert engine.lora_names() == ["other", TINY_LORA_NAME]
    same, _ = await collect(engine, with_lora("o1", PROMPTS[1], "other"))
    assert same == (await collect(engine, with_lora("o2", PROMPTS[1], TINY_LORA_NAME)))[0]
    from servegrid.engines.base import EngineConfigError

    with pytest.raises(EngineConfigError, match="PEFT directory"):
        await engine.load_lora("broken", str(model_dir / "nowhere"))
