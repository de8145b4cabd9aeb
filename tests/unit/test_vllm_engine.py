"""The vLLM adapter against a fake vLLM that records calls (vLLM cannot run here: no GPU).

What is real: the adapter, vLLM-style argument parsing (argparse), the ZMQ transport of KV
events (pyzmq sockets on loopback, in vLLM's wire format), and servegrid's KV-transfer bulk
path between a prefill and a decode engine. What is fake: the engine behind ``generate``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import msgspec
import pytest
import pytest_asyncio

from servegrid.engines.base import (
    EngineConfigError,
    EngineRequest,
    EngineRequestError,
    KvEvent,
    SamplingParams,
)
from servegrid.engines.registry import create_engine
from servegrid.engines.vllm import VllmEngine
from servegrid.engines.vllm.kv_events import VllmKvEventTranslator
from servegrid.kv_transfer import KvReceiver, send_kv
from servegrid.llm.kv_hash import block_hashes
from tests.support.optional import require_modules
from tests.unit import fake_vllm

SETTINGS = {
    "engine": "vllm",
    "model": "org/some-model",
    "enforce-eager": True,
    "block-size": 16,
    "max-model-len": 8192,
    "max-num-batched-tokens": 4096,
    "enable-prefix-caching": False,
    "tensor-parallel-size": 2,
    "gpu-memory-utilization": 0.85,
    "distributed-executor-backend": "ray",
    "trust-remote-code": False,
    "remote-prefill": True,
    "max-local-prefill-length": 512,
}


@pytest.fixture
def vllm(monkeypatch):
    require_modules("zmq", extra="dev")  # the KV-event transport is real ZMQ
    return fake_vllm.install(monkeypatch)


@pytest_asyncio.fixture
async def started(vllm) -> AsyncIterator[VllmEngine]:
    engine = create_engine("vllm", SETTINGS)
    assert isinstance(engine, VllmEngine)
    events: list[KvEvent] = []
    engine.set_kv_event_sink(events.append)
    engine.events = events  # type: ignore[attr-defined]
    await engine.start()
    yield engine
    await engine.stop()


def request(
    rid: str, prompt: list[int], n: int = 4, lora_name: str | None = None, **sampling
) -> EngineRequest:
    return EngineRequest(rid, prompt, SamplingParams(max_tokens=n, **sampling), lora_name=lora_name)


def llm_of(engine: VllmEngine) -> fake_vllm.FakeAsyncLLM:
    return engine.llm


# -- engine arguments ------------------------------------------------------------------


async def test_config_keys_become_vllm_engine_args(started: VllmEngine):
    args = llm_of(started).engine_args
    assert args.model == "org/some-model"
    assert args.enforce_eager is True
    assert args.block_size == 16
    assert args.max_model_len == 8192
    assert args.max_num_batched_tokens == 4096
    assert args.enable_prefix_caching is False  # --no-enable-prefix-caching, not left out
    assert args.tensor_parallel_size == 2
    assert args.gpu_memory_utilization == 0.85
    assert args.distributed_executor_backend == "ray"
    assert args.trust_remote_code is False
    # servegrid's own keys stay with servegrid
    assert started.plan is not None
    assert set(started.plan.ignored_keys) == {"remote-prefill", "max-local-prefill-length"}
    # KV events come to this worker over loopback; a decode worker gets a KV connector
    events = args.kv_events_config
    assert events.enable_kv_cache_events and events.publisher == "zmq"
    assert events.endpoint.startswith("tcp://127.0.0.1:")
    assert (args.kv_transfer_config.kv_connector, args.kv_transfer_config.kv_role) == (
        "NixlConnector",
        "kv_both",
    )


async def test_vllms_own_kv_transfer_config_is_passed_through(vllm):
    config = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
    engine = VllmEngine({"kv-transfer-config": config}, "m", kv_events_port=None)
    await engine.start()
    try:
        assert llm_of(engine).engine_args.kv_transfer_config.kv_connector == "LMCacheConnectorV1"
        assert "--kv-transfer-config=" + json.dumps(config) in engine.plan.argv
    finally:
        await engine.stop()


async def test_a_bad_value_is_one_config_error(vllm, capsys):
    engine = VllmEngine({"block-size": 24}, "m")
    with pytest.raises(EngineConfigError, match="--block-size=24"):
        await engine.start()
    assert "invalid choice: 24" in capsys.readouterr().err


async def test_tensor_parallel_beyond_local_gpus_needs_ray(vllm, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    engine = VllmEngine({"tensor-parallel-size": 16}, "m")
    with pytest.raises(EngineConfigError, match="distributed-executor-backend: ray"):
        await engine.start()
    engine = VllmEngine({"tensor-parallel-size": 16, "distributed-executor-backend": "ray"}, "m")
    await engine.start()
    try:
        assert llm_of(engine).engine_args.tensor_parallel_size == 16
    finally:
        await engine.stop()


def test_without_vllm_installed_the_engine_says_how_to_get_it():
    from servegrid.engines.vllm.api import vllm_installed

    if vllm_installed():
        pytest.skip("vLLM is installed here; this checks the message where it is not")
    with pytest.raises(EngineConfigError, match=r"pip install 'servegrid\[vllm\]'"):
        create_engine("vllm", {"model": "m"})


# -- streaming and cancellation --------------------------------------------------------


async def test_generate_streams_deltas_with_the_requests_sampling(started: VllmEngine):
    prompt = list(range(10, 30))
    outputs = [
        o
        async for o in started.generate(
            request("r1", prompt, 5, temperature=0.7, top_p=0.9, seed=42, stop_token_ids=[999])
        )
    ]
    assert [o.token_ids for o in outputs] == [[30], [31], [32], [33], [34]]
    assert [o.finish_reason for o in outputs] == [None, None, None, None, "length"]
    assert outputs[0].cached_tokens == 3
    call = llm_of(started).calls[-1]
    assert call.request_id == "r1"
    assert call.prompt == {"prompt_token_ids": prompt}
    sp = call.sampling_params
    assert (sp.n, sp.max_tokens, sp.temperature, sp.top_p, sp.seed) == (1, 5, 0.7, 0.9, 42)
    assert sp.stop_token_ids == [999]
    assert sp.detokenize is False
    assert sp.output_kind is fake_vllm.RequestOutputKind.DELTA
    assert sp.extra_args is None
    assert llm_of(started).aborted == []


async def test_a_stop_token_ends_with_stop(started: VllmEngine):
    outputs = [o async for o in started.generate(request("r2", [5, 6], 10, stop_token_ids=[9]))]
    assert [t for o in outputs for t in o.token_ids] == [7, 8, 9]
    assert outputs[-1].finish_reason == "stop"


async def test_closing_the_stream_aborts_the_request_in_vllm(started: VllmEngine):
    stream = started.generate(request("gone", [1, 2, 3], 100))
    await anext(stream)
    await anext(stream)
    assert started.load_metrics().active_requests == 1
    await stream.aclose()
    llm = llm_of(started)
    assert llm.aborted == ["gone"]
    assert llm.calls[-1].closed_early and llm.calls[-1].yielded == 2
    assert started.load_metrics().active_requests == 0


async def test_bad_requests_are_client_errors(started: VllmEngine):
    with pytest.raises(EngineRequestError, match="prompt is empty"):
        started.generate(request("e", []))
    with pytest.raises(EngineRequestError, match="max_tokens"):
        started.generate(request("z", [1], 0))


async def test_stop_shuts_vllm_down(vllm):
    engine = VllmEngine({}, "m")
    await engine.start()
    llm = llm_of(engine)
    await engine.stop()
    assert llm.shut_down


# -- KV events -------------------------------------------------------------------------


async def next_event(events: list[KvEvent], seen: int) -> KvEvent:
    """The event after the first ``seen`` (the ZMQ transport is asynchronous)."""
    for _ in range(500):
        if len(events) > seen:
            return events[seen]
        await asyncio.sleep(0.01)
    raise AssertionError(f"no KV event after {seen}: {events}")


async def test_vllm_kv_events_reach_the_sink_with_the_routers_hashes(started: VllmEngine):
    # ZMQ drops what a PUB sends before its connection is up ("slow joiner"): repeat the
    # first request (from an empty fake cache) until the subscriber sees its event.
    events: list[KvEvent] = started.events  # type: ignore[attr-defined]
    llm = llm_of(started)
    prompt = list(range(100, 140))  # two full blocks of 16
    for attempt in range(50):
        llm._cached.clear()
        _ = [o async for o in started.generate(request(f"ev{attempt}", prompt, 1))]
        await asyncio.sleep(0.05)
        if events:
            break
    assert events, "no KV event arrived over ZMQ"
    stored = events[-1]
    assert stored.kind == "stored"
    assert stored.block_hashes == block_hashes(prompt, 16)  # what the processor routes by
    assert stored.parent_hash is None
    assert started.prefix_hit_tokens(prompt) == 32
    assert set(started.cached_block_hashes()) == set(block_hashes(prompt, 16))
    # a longer prompt on the same prefix chains from the cached parent
    seen = len(events)
    longer = prompt + list(range(500, 520))
    _ = [o async for o in started.generate(request("ev-long", longer, 1))]
    event = await next_event(events, seen)
    assert event.block_hashes == block_hashes(longer, 16)[2:]
    assert event.parent_hash == block_hashes(prompt, 16)[-1]
    llm.evict(1)
    event = await next_event(events, seen + 1)
    assert event.kind == "removed"
    assert event.block_hashes == [block_hashes(longer, 16)[-1]]
    llm.evict_all()
    event = await next_event(events, seen + 2)
    assert event.kind == "cleared" and started.cached_block_hashes() == []


def test_translator_skips_blocks_whose_parent_it_never_saw():
    translator = VllmKvEventTranslator()
    orphan = ["BlockStored", [b"h2"], b"h1", list(range(16)), 16, None, "GPU"]
    assert translator.feed_payload(msgspec.msgpack.encode([0.0, [orphan]])) == []
    assert translator.skipped_blocks == 1
    root = ["BlockStored", [7, 8], None, list(range(32)), 16]  # int hashes (older vLLM)
    (event,) = translator.feed_payload(msgspec.msgpack.encode([0.0, [root], 0]))
    assert event.block_hashes == block_hashes(list(range(32)), 16)
    gap = translator.feed_message([b"t", (5).to_bytes(8, "big"), msgspec.msgpack.encode([0.0, []])])
    assert gap == [] and translator.last_sequence == 5


# -- disaggregation through vLLM's KV connector -----------------------------------------


async def test_decode_passes_the_transfer_parameters_prefill_returned(vllm):
    require_modules("zmq", extra="dev")
    prefill = VllmEngine({"kv-connector": "NixlConnector"}, "m")
    decode = VllmEngine({"remote-prefill": True}, "m")
    await prefill.start()
    await decode.start()
    receiver = KvReceiver(decode, "127.0.0.1", "127.0.0.1")
    await receiver.start()
    try:
        assert llm_of(prefill).engine_args.kv_transfer_config.kv_connector == "NixlConnector"
        req = request("pd-1", list(range(1, 41)), 6, temperature=0.0)
        reservation = decode.reserve_kv(req)
        assert reservation is not None
        target, arrived = receiver.expect(reservation)
        kv = await prefill.prefill_kv(req, target.first_token, target.num_tokens)
        await send_kv(target, kv)  # over servegrid's bulk path, as the PrefillWorker does
        await arrived
        # the prefill ran one token and asked vLLM to keep the KV for a remote decode
        prefill_call = llm_of(prefill).calls[-1]
        assert prefill_call.sampling_params.max_tokens == 1
        assert prefill_call.sampling_params.extra_args["kv_transfer_params"]["do_remote_decode"]
        returned = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": llm_of(prefill).engine_id,
            "remote_block_ids": [0, 1, 2],
            "remote_host": "10.0.0.7",
            "remote_port": 5600,
        }
        assert receiver.bytes_received == len(msgspec.json.encode(returned))
        tokens = [t async for o in decode.generate_reserved(reservation) for t in o.token_ids]
        assert len(tokens) == 6
        decode_call = llm_of(decode).calls[-1]
        assert decode_call.sampling_params.extra_args == {"kv_transfer_params": returned}
        assert decode_call.prompt == {"prompt_token_ids": req.token_ids}
    finally:
        await receiver.stop()
        await prefill.stop()
        await decode.stop()


async def test_prefill_without_a_kv_connector_fails_the_request_not_the_worker(vllm):
    engine = VllmEngine({}, "m")  # no kv-connector, not a decode worker: no KV connector
    await engine.start()
    try:
        assert llm_of(engine).engine_args.kv_transfer_config is None
        with pytest.raises(EngineRequestError, match="needs a KV connector"):
            await engine.prefill_kv(request("p", [1, 2, 3], 1), 0, 2)
    finally:
        await engine.stop()


# -- LoRA ------------------------------------------------------------------------------


async def test_lora_adapters_reach_vllm_as_lora_requests(vllm):
    engine = VllmEngine({"lora-adapters": {"sql": "/adapters/sql"}}, "m")
    await engine.start()
    try:
        assert "--enable-lora" in engine.plan.argv
        assert llm_of(engine).engine_args.enable_lora is True
        assert engine.lora_names() == ["sql"]
        _ = [o async for o in engine.generate(request("l1", [1, 2, 3], 2, lora_name="sql"))]
        assert llm_of(engine).calls[-1].lora_request == fake_vllm.LoRARequest(
            "sql", 1, "/adapters/sql"
        )
        await engine.load_lora("chat", "/adapters/chat")  # at run time
        _ = [o async for o in engine.generate(request("l2", [1, 2, 3], 2, lora_name="chat"))]
        assert llm_of(engine).calls[-1].lora_request.lora_int_id == 2
        _ = [o async for o in engine.generate(request("l3", [1, 2, 3], 2))]
        assert llm_of(engine).calls[-1].lora_request is None
        with pytest.raises(EngineRequestError, match="'nope' is not loaded"):
            engine.generate(request("l4", [1], 1, lora_name="nope"))
    finally:
        await engine.stop()


async def test_loading_an_adapter_needs_lora_enabled(vllm):
    engine = VllmEngine({}, "m")
    await engine.start()
    try:
        with pytest.raises(EngineConfigError, match="enable-lora"):
            await engine.load_lora("x", "/adapters/x")
    finally:
        await engine.stop()
