"""Disaggregation with the torch engine, in process: real KV tensors over the bulk TCP path.

Three engines on the tiny random Llama: an aggregated one (the reference), a prefill one and
a decode one. The prefill engine computes a prompt's KV, ``send_kv`` ships its blocks over
loopback TCP into the decode engine's reserved blocks (``KvReceiver``), and the decode engine
continues from them. Served end to end (two processes) in tests/system/test_torch_graph.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.support.optional import require_modules

require_modules("torch", "transformers", extra="torch")

from servegrid.engines.base import EngineRequest, KvEvent, SamplingParams  # noqa: E402
from servegrid.engines.disagg import PrefilledKv  # noqa: E402
from servegrid.engines.registry import create_engine  # noqa: E402
from servegrid.engines.torch import TorchEngine  # noqa: E402
from servegrid.kv_transfer import KvReceiver, send_kv  # noqa: E402
from servegrid.llm.kv_hash import block_hashes  # noqa: E402
from servegrid.llm.model_init import init_model  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="module")

BLOCK = 16


class Engines:
    def __init__(self, agg: TorchEngine, prefill: TorchEngine, decode: TorchEngine) -> None:
        self.agg, self.prefill, self.decode = agg, prefill, decode
        self.receiver = KvReceiver(decode, "127.0.0.1", "127.0.0.1")
        self.decode_events: list[KvEvent] = []
        decode.set_kv_event_sink(self.decode_events.append)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Engines]:
    model = init_model(tmp_path_factory.mktemp("models") / "tiny")
    config = {"model": str(model), "device": "cpu", "block-size": BLOCK, "num-gpu-blocks": 64}
    made = [create_engine("torch", config) for _ in range(3)]
    for engine in made:
        await engine.start()
    group = Engines(*made)  # type: ignore[arg-type]
    await group.receiver.start()
    yield group
    await group.receiver.stop()
    for engine in made:
        await engine.stop()


def greedy(rid: str, prompt: list[int], n: int = 10) -> EngineRequest:
    return EngineRequest(rid, prompt, SamplingParams(max_tokens=n, temperature=0.0))


async def tokens_of(stream) -> list[int]:
    return [t async for o in stream for t in o.token_ids]


async def disaggregated(
    engines: Engines, request: EngineRequest, tamper=None
) -> tuple[list[int], int, int]:
    """Prefill on one engine, ship, decode on the other: (tokens, first_token, bytes)."""
    reservation = engines.decode.reserve_kv(request)
    assert reservation is not None
    target, arrived = engines.receiver.expect(reservation)
    kv = await engines.prefill.prefill_kv(request, target.first_token, target.num_tokens)
    if tamper is not None:
        kv = tamper(kv)
    before = engines.receiver.bytes_received
    try:
        await send_kv(target, kv)
    finally:
        kv.release()
    await arrived
    sent = engines.receiver.bytes_received - before
    tokens = await tokens_of(engines.decode.generate_reserved(reservation))
    return tokens, reservation.first_token, sent


async def test_disaggregated_greedy_output_equals_aggregated(engines: Engines):
    per_block = engines.decode._cache.bytes_per_block  # type: ignore[union-attr]
    for i, prompt in enumerate([list(range(40, 77)), list(range(200, 217)), list(range(7, 58))]):
        request = greedy(f"d{i}", prompt)
        expected = await tokens_of(engines.agg.generate(request))
        computed_before = engines.decode.prefill_tokens
        engines.decode_events.clear()
        tokens, first, sent = await disaggregated(engines, request)
        assert tokens == expected, f"prompt {i}"
        num_tokens = len(prompt) - 1
        assert first == 0
        # every block holding tokens [0, len - 1) crossed the wire, whole
        assert sent == -(-num_tokens // BLOCK) * per_block
        # the decode engine computed only the last prompt token itself
        assert engines.decode.prefill_tokens - computed_before == 1
        # and reported the received full blocks as stored, under the router's hashes
        stored = [h for e in engines.decode_events if e.kind == "stored" for h in e.block_hashes]
        assert stored[: num_tokens // BLOCK] == block_hashes(prompt[:num_tokens], BLOCK)


async def test_the_decode_engine_really_uses_the_received_tensors(engines: Engines):
    prompt = list(range(600, 650))
    expected = await tokens_of(engines.agg.generate(greedy("t-agg", prompt)))

    def zeroed(kv: PrefilledKv) -> PrefilledKv:
        blank = [memoryview(bytes(len(s))) for s in kv.segments]
        return PrefilledKv(kv.first_token, kv.num_tokens, kv.logical_bytes, blank, kv.release)

    tokens, _, _ = await disaggregated(engines, greedy("t-zero", prompt), tamper=zeroed)
    assert tokens != expected


async def test_only_what_the_decode_cache_lacks_is_shipped(engines: Engines):
    shared = list(range(900, 932))  # two full blocks the decode engine will hold
    await tokens_of(engines.decode.generate(greedy("warm", [*shared, 1, 2, 3], 1)))
    prompt = [*shared, *range(1200, 1230)]
    expected = await tokens_of(engines.agg.generate(greedy("p-agg", prompt)))
    tokens, first, sent = await disaggregated(engines, greedy("p-dis", prompt))
    assert first == 32
    per_block = engines.decode._cache.bytes_per_block  # type: ignore[union-attr]
    assert sent == (-(-(len(prompt) - 1) // BLOCK) - 2) * per_block
    assert tokens == expected


async def test_a_released_reservation_gives_its_blocks_back(engines: Engines):
    before = engines.decode.load_metrics().active_blocks
    reservation = engines.decode.reserve_kv(greedy("r", list(range(1500, 1560))))
    assert reservation is not None
    assert engines.decode.load_metrics().active_blocks == before + len(reservation.block_ids)
    engines.decode.release_kv(reservation)
    engines.decode.release_kv(reservation)  # idempotent
    assert engines.decode.load_metrics().active_blocks == before


async def test_prefill_blocks_are_held_until_the_transfer_is_released(engines: Engines):
    before = engines.prefill.load_metrics().active_blocks
    prompt = list(range(1700, 1745))
    kv = await engines.prefill.prefill_kv(greedy("h", prompt), 0, len(prompt) - 1)
    assert engines.prefill.load_metrics().active_blocks > before
    kv.release()
    kv.release()
    assert engines.prefill.load_metrics().active_blocks == before
