"""KV transfer: the mocker's reserve/commit/decode path and the bulk path between two engines."""

from __future__ import annotations

import asyncio

import pytest

from servegrid.engines.base import EngineRequest, KvEvent, SamplingParams
from servegrid.engines.disagg import KvLayout
from servegrid.engines.mocker import KvTransferMocker, create
from servegrid.engines.mocker.kv_transfer import DEFAULT_LAYOUT
from servegrid.kv_transfer import KvReceiver, KvTransferRefusedError, send_kv
from servegrid.kv_transfer.receiver import RemotePrefillFailedError
from servegrid.llm.kv_hash import block_hashes

FAST = {"speedup-ratio": 1000}
PROMPT = list(range(3, 103))  # 100 tokens: 6 full blocks of 16, and 4 more


def req(rid: str, tokens: list[int] = PROMPT, max_tokens: int = 8) -> EngineRequest:
    return EngineRequest(rid, tokens, SamplingParams(max_tokens=max_tokens, seed=7))


@pytest.fixture
async def engines():
    made: list[KvTransferMocker] = []

    async def make(**config) -> tuple[KvTransferMocker, list[KvEvent]]:
        events: list[KvEvent] = []
        engine = create({**FAST, **config})
        engine.set_kv_event_sink(events.append)
        await engine.start()
        made.append(engine)
        return engine, events

    yield make
    for engine in made:
        await engine.stop()


async def tokens(stream) -> list[int]:
    return [t async for out in stream for t in out.token_ids]


def test_layout_bytes_come_from_the_model_config():
    llama_1b = {
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_size": 2048,
        "torch_dtype": "bfloat16",
    }
    layout = KvLayout.from_model_config(llama_1b)
    assert layout == DEFAULT_LAYOUT
    assert layout.bytes_per_token == 2 * 16 * 8 * 64 * 2
    assert layout.bytes_for(1000) == 32768 * 1000


async def test_decode_from_committed_blocks_matches_local_and_reports_stored(engines):
    local, _ = await engines()
    expected = await tokens(local.generate(req("local")))

    decode, events = await engines()
    reservation = decode.reserve_kv(req("remote"))
    assert reservation is not None
    assert (reservation.first_token, reservation.num_tokens) == (0, 99)
    assert len(reservation.block_ids) == 7  # ceil(99 / 16): the last token is computed here
    decode.commit_kv(reservation)
    stored = [h for e in events if e.kind == "stored" for h in e.block_hashes]
    assert stored == block_hashes(PROMPT, 16)[:6]  # the full blocks of the received KV

    outputs = [out async for out in decode.generate_reserved(reservation)]
    assert [t for out in outputs for t in out.token_ids] == expected
    assert decode.load_metrics().active_blocks == 0


async def test_reservation_skips_what_the_cache_holds_and_release_frees_it(engines):
    decode, _ = await engines()
    await tokens(decode.generate(req("warm", PROMPT[:40])))  # caches 2 full blocks
    reservation = decode.reserve_kv(req("r"))
    assert reservation is not None and reservation.first_token == 32
    decode.release_kv(reservation)
    decode.release_kv(reservation)  # idempotent
    assert decode.load_metrics().active_blocks == 0


async def test_no_room_means_no_reservation(engines):
    decode, _ = await engines(**{"num-gpu-blocks": 10})
    first = decode.reserve_kv(req("first"))
    assert first is not None
    assert decode.reserve_kv(req("second", PROMPT[::-1])) is None  # 7 more blocks: 3 left
    decode.release_kv(first)
    assert decode.load_metrics().active_blocks == 0


async def test_bulk_path_moves_kv_from_a_prefill_engine_to_a_decode_engine(engines):
    prefill, prefill_events = await engines()
    decode, decode_events = await engines()
    receiver = KvReceiver(decode, "127.0.0.1", "127.0.0.1")
    await receiver.start()
    try:
        reservation = decode.reserve_kv(req("r1"))
        assert reservation is not None
        target, arrived = receiver.expect(reservation)
        kv = await prefill.prefill_kv(req("r1"), target.first_token, target.num_tokens)
        assert kv.logical_bytes == prefill.kv_layout().bytes_for(99)
        await send_kv(target, kv, bandwidth_bytes_per_s=1e12)
        await asyncio.wait_for(arrived, 5)
        assert reservation.committed
        assert receiver.transfers_received == 1
        assert receiver.logical_bytes_received == kv.logical_bytes
        assert [e for e in decode_events if e.kind == "stored"]
        assert [e for e in prefill_events if e.kind == "stored"]
        assert len(await tokens(decode.generate_reserved(reservation))) == 8

        # A transfer nobody waits for any more (deadline passed) is refused.
        late = decode.reserve_kv(req("r2", PROMPT[::-1]))
        assert late is not None
        late_target, _ = receiver.expect(late)
        assert receiver.withdraw(late_target.transfer_id)
        decode.release_kv(late)
        with pytest.raises(KvTransferRefusedError, match="gave up"):
            await send_kv(late_target, kv)
        assert receiver.refused == 1

        # A prefill worker's failure reaches the waiting decode request at once.
        failing = decode.reserve_kv(req("r3", [5] * 60))
        assert failing is not None
        fail_target, failed = receiver.expect(failing)
        await send_kv(fail_target, None, error="prompt too long")
        with pytest.raises(RemotePrefillFailedError, match="too long"):
            await asyncio.wait_for(failed, 5)
        decode.release_kv(failing)
    finally:
        await receiver.stop()


async def test_unreachable_decode_worker_is_a_refusal(engines):
    prefill, _ = await engines()
    decode, _ = await engines()
    receiver = KvReceiver(decode, "127.0.0.1", "127.0.0.1")
    await receiver.start()
    reservation = decode.reserve_kv(req("gone"))
    assert reservation is not None
    target, _ = receiver.expect(reservation)
    await receiver.stop()
    kv = await prefill.prefill_kv(req("gone"), target.first_token, target.num_tokens)
    with pytest.raises(KvTransferRefusedError, match="unreachable"):
        await send_kv(target, kv, timeout=5)
