"""The KV router's parts: index, selection, predicted caches, event sequencing, publishing."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from servegrid.engines.base import CLEARED, REMOVED, STORED, EngineRequest, KvEvent, SamplingParams
from servegrid.engines.mocker import MockerConfig, MockerEngine
from servegrid.kv_router.config import KvRouterConfig
from servegrid.kv_router.indexer import ApproxIndexer, KvIndexer
from servegrid.kv_router.protocol import (
    KvEventBatch,
    KvSnapshot,
    LoadReport,
    decode_batch,
    decode_load,
    encode,
)
from servegrid.kv_router.publisher import KvPublisher
from servegrid.kv_router.router import KvRouter
from servegrid.kv_router.scheduler import LoadTracker, choose, costs
from servegrid.kv_router.sync import EventSync
from servegrid.llm.kv_hash import block_hashes
from servegrid.sdk.errors import ConfigError

BS = 4
A, B, C = 0xA, 0xB, 0xC


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def prompt(*blocks: int) -> list[int]:
    """Token ids made of blocks of BS equal ids: prompt(1, 2) shares its first block with
    prompt(1, 3)."""
    return [b for b in blocks for _ in range(BS)]


def hashes(*blocks: int) -> list[int]:
    return block_hashes(prompt(*blocks), BS)


# -- indexer ---------------------------------------------------------------------------------


def test_overlap_counts_leading_blocks_per_worker():
    index = KvIndexer()
    index.store(A, hashes(1, 2, 3))
    index.store(B, hashes(1, 2))
    index.store(C, hashes(9))
    assert index.overlaps(hashes(1, 2, 3, 4)) == {A: 3, B: 2}
    assert index.overlaps(hashes(1, 5)) == {A: 1, B: 1}
    assert index.overlaps(hashes(2, 3)) == {}  # same blocks after another prefix: no match


def test_overlap_stops_at_a_removed_block_even_if_later_blocks_remain():
    index = KvIndexer()
    index.store(A, hashes(1, 2, 3))
    index.remove(A, hashes(1, 2)[1:])
    assert index.overlaps(hashes(1, 2, 3)) == {A: 1}
    assert index.block_count(A) == 2


def test_clear_and_remove_worker():
    index = KvIndexer()
    index.store(A, hashes(1, 2))
    index.store(B, hashes(1, 2))
    index.apply(A, KvEvent(CLEARED))
    assert index.overlaps(hashes(1, 2)) == {B: 2}
    assert index.knows(A) and index.block_count(A) == 0
    index.remove_worker(B)
    assert index.overlaps(hashes(1, 2)) == {}
    assert not index.knows(B) and index.block_count() == 0


def test_events_apply_stores_and_removals():
    index = KvIndexer()
    chain = hashes(1, 2, 3)
    index.apply(A, KvEvent(STORED, chain[:2]))
    index.apply(A, KvEvent(STORED, chain[2:], chain[1]))
    assert index.overlaps(chain) == {A: 3}
    index.apply(A, KvEvent(REMOVED, chain[2:]))
    assert index.overlaps(chain) == {A: 2}


def test_mocker_events_match_the_routers_hashes_of_the_same_prompt():
    """Engine and router hash the same way: what the mocker stores is what the router looks up."""

    async def run() -> list[KvEvent]:
        engine = MockerEngine(MockerConfig(block_size=BS, speedup_ratio=1000.0))
        events: list[KvEvent] = []
        engine.set_kv_event_sink(events.append)
        tokens = [*prompt(5, 6, 7), 1]
        request = EngineRequest("r", tokens, SamplingParams(max_tokens=2))
        async for _ in engine.generate(request):
            pass
        await engine.stop()
        return events

    index = KvIndexer()
    for event in asyncio.run(run()):
        index.apply(A, event)
    assert index.overlaps(hashes(5, 6, 7)) == {A: 3}


# -- selection -------------------------------------------------------------------------------


def test_cost_is_weighted_new_prefill_blocks_plus_active_blocks_with_the_request():
    # A holds 8 of the 10 prompt blocks and has 10 active; the request holds 11 once admitted
    worker_costs = costs([A, B], {A: 8}, {}, 10, 11, {A: 10}, overlap_score_weight=2.0)
    assert worker_costs == [2.0 * 2 + (10 + 11), 2.0 * 10 + (0 + 11)]
    assert choose([A, B], worker_costs, 0.0, random.Random(1)) == A
    # 8 of its blocks already in use by requests running on A add nothing there
    worker_costs = costs([A, B], {A: 8}, {A: 8}, 10, 11, {A: 10}, overlap_score_weight=2.0)
    assert worker_costs == [2.0 * 2 + (10 + 3), 2.0 * 10 + (0 + 11)]


def test_ties_are_broken_at_random():
    rng = random.Random(7)
    picks = Counter(choose([A, B, C], [5.0, 5.0, 9.0], 0.0, rng) for _ in range(600))
    assert set(picks) == {A, B}
    assert min(picks.values()) > 200


def test_temperature_samples_cheaper_workers_more_often_but_not_only():
    rng = random.Random(3)
    picks = Counter(choose([A, B], [0.0, 10.0], 0.5, rng) for _ in range(2000))
    assert picks[A] > picks[B] > 0
    # exp(-0/0.5) : exp(-1/0.5) = 1 : e^-2, so B gets about 12%
    assert 0.08 < picks[B] / 2000 < 0.17
    picks = Counter(choose([A, B], [4.0, 4.0], 1.0, rng) for _ in range(400))
    assert set(picks) == {A, B}


def test_load_tracker_counts_sends_until_a_report_covers_them():
    clock = Clock()
    loads = LoadTracker(clock)
    loads.routed(A, "r1", 5)
    loads.routed(A, "r2", 3)
    loads.routed(A, "r2", 3)  # the same id again (a retry) counts once
    assert loads.active_blocks(A) == 8
    loads.on_report(LoadReport(A, 6, 100, 1, 0, ["r1"]))
    assert loads.active_blocks(A) == 6 + 3
    loads.on_report(LoadReport(B, 0, 100, 0, 0, ["r2"]))  # another worker's report: no
    assert loads.active_blocks(A) == 6 + 3
    clock.now += 60  # never covered (served elsewhere after a retry): it expires
    assert loads.active_blocks(A) == 6


def test_prompt_blocks_count_as_in_use_until_the_worker_reports_the_request_finished():
    clock = Clock()
    loads = LoadTracker(clock)
    loads.routed(A, "early", 3, hashes(1, 2, 3))  # A never reported: it cannot say when
    assert loads.in_use_prefix(hashes(1, 2, 3)) == {}
    loads.on_report(LoadReport(A, 0, 100, 0, 0))
    loads.on_report(LoadReport(B, 0, 100, 0, 0))
    loads.routed(A, "r1", 3, hashes(1, 2, 3))
    loads.routed(A, "r2", 2, hashes(1, 2))
    loads.routed(B, "r3", 1, hashes(1, 7))
    assert loads.in_use_prefix(hashes(1, 2, 3, 4)) == {A: 3, B: 1}
    loads.on_report(LoadReport(A, 5, 100, 2, 0, ["r1", "r2"], ["r1"]))
    assert loads.in_use_prefix(hashes(1, 2, 3, 4)) == {A: 2, B: 1}  # r2 still uses 1, 2
    assert loads.running() == 2
    clock.now += 400  # never reported finished (its worker vanished): forgotten
    loads.expire()
    assert loads.in_use_prefix(hashes(1, 2)) == {} and loads.running() == 0


def test_a_shared_prefix_in_use_on_a_busy_worker_costs_nothing_there():
    """What the routing benchmark showed: a worker idle for a moment reports no active
    blocks, one running a request over the shared system prompt reports those blocks too.
    Counting that as load sent users away from the worker holding their history; the
    system prompt would become active on the idle worker all the same."""
    config = KvRouterConfig(block_size=BS, overlap_score_weight=1.0)
    router = KvRouter(config, rng=random.Random(0))
    router.update_members([A, B])
    router.sync.on_snapshot(A, KvSnapshot(A, 0, hashes(1, 2, 3)))  # system prompt 1, 2, 3
    router.sync.on_snapshot(B, KvSnapshot(B, 0, hashes(1, 2, 3, 4, 5, 6, 7, 8)))  # + history
    router.on_load(encode(LoadReport(A, 0, 100, 0, 0)))
    router.on_load(encode(LoadReport(B, 0, 100, 0, 0)))
    # Another user's turn runs on B: system prompt + 3 own blocks + its first token's block.
    router.loads.routed(B, "other", 7, hashes(1, 2, 3, 9, 11, 12))
    router.on_load(encode(LoadReport(B, 7, 100, 1, 0, ["other"])))
    turn = prompt(1, 2, 3, 4, 5, 6, 7, 8, 10)  # 9 blocks, 10 once admitted
    # A: 6 to prefill + 10 to activate = 16; B: 1 to prefill + 7 active + 7 more = 15.
    # Counting the running request's system prompt as load (8 on B against 6 on A) would
    # have chosen A and prefilled the user's history again.
    decision = router.route(turn, [A, B], "turn")
    assert (decision.worker_id, decision.overlap_blocks) == (B, 8)
    # Once that request finished, the prompt blocks on B are merely cached, as on A.
    router.on_load(encode(LoadReport(B, 7, 100, 1, 0, ["turn"], ["other", "turn"])))
    assert router.route(turn, [A, B], "again").worker_id == A


def test_a_burst_spreads_before_any_report_arrives():
    router = KvRouter(KvRouterConfig(block_size=BS), rng=random.Random(0))
    chosen = Counter(
        router.route(prompt(i, i + 1, i + 2), [A, B], f"r{i}").worker_id for i in range(40)
    )
    assert chosen[A] == chosen[B] == 20


def test_kv_routing_prefers_the_worker_holding_the_prefix_and_reports_the_overlap():
    router = KvRouter(KvRouterConfig(block_size=BS), rng=random.Random(0))
    router.update_members([A, B])
    router.sync.on_snapshot(A, KvSnapshot(A, 0, hashes(1, 2, 3)))
    router.sync.on_snapshot(B, KvSnapshot(B, 0, []))
    decision = router.route(prompt(1, 2, 3, 4), [A, B], "r")
    assert (decision.worker_id, decision.overlap_blocks, decision.prompt_blocks) == (A, 3, 4)
    # ... unless its load outweighs the saving: 3 blocks saved vs 50 active blocks
    router.on_load(encode(LoadReport(A, 50, 100, 4, 0, ["r"])))
    assert router.route(prompt(1, 2, 3, 4), [A, B], "s").worker_id == B


def test_config_keys_are_checked_with_a_clear_message():
    cfg = KvRouterConfig.from_settings(
        {"overlap-score-weight": 2, "router-temperature": 0.5, "block-size": 32, "x": 1}, "Router"
    )
    assert (cfg.overlap_score_weight, cfg.router_temperature, cfg.block_size) == (2.0, 0.5, 32)
    with pytest.raises(ConfigError, match=r"Router: bad KV router setting.*router-temperature"):
        KvRouterConfig.from_settings({"router-temperature": -1}, "Router")


# -- approximate mode ------------------------------------------------------------------------


def test_predicted_blocks_expire_after_the_ttl_unless_routed_again():
    clock = Clock()
    index = ApproxIndexer(ttl=10.0, clock=clock)
    index.routed(A, hashes(1, 2))
    clock.now += 6
    index.routed(B, hashes(1, 2, 3))
    index.routed(A, hashes(1))  # refreshes A's first block only
    assert index.overlaps(hashes(1, 2, 3)) == {A: 2, B: 3}
    clock.now += 5  # A's second block is 11 s old now
    assert index.overlaps(hashes(1, 2, 3)) == {A: 1, B: 3}
    clock.now += 10
    assert index.overlaps(hashes(1, 2, 3)) == {}
    assert index.block_count() == 0


def test_approximate_router_sends_a_repeated_prefix_to_the_same_worker():
    clock = Clock()
    router = KvRouter(
        KvRouterConfig(block_size=BS, use_kv_events=False, router_ttl=30),
        rng=random.Random(5),
        clock=clock,
    )
    first = router.route(prompt(1, 2, 3, 4, 5, 6), [A, B], "r1")
    router.loads.on_report(LoadReport(first.worker_id, 0, 100, 0, 0, ["r1"]))
    again = router.route(prompt(1, 2, 3, 4, 5, 6, 7), [A, B], "r2")
    assert again.worker_id == first.worker_id and again.overlap_blocks == 6
    clock.now += 31
    assert router.route(prompt(1, 2, 3, 4, 5, 6, 7), [A, B], "r3").overlap_blocks == 0


# -- sequencing and re-synchronisation -------------------------------------------------------


def stored(worker: int, seq: int, *blocks: int) -> KvEventBatch:
    return KvEventBatch(worker, seq, [KvEvent(STORED, hashes(*blocks))])


def test_in_order_batches_apply_and_duplicates_are_dropped():
    index = KvIndexer()
    asked: list[int] = []
    sync = EventSync(index, asked.append)
    sync.on_snapshot(A, KvSnapshot(A, 0, []))
    sync.on_batch(stored(A, 1, 1))
    sync.on_batch(stored(A, 2, 1, 2))
    sync.on_batch(stored(A, 2, 1, 2))
    assert index.overlaps(hashes(1, 2)) == {A: 2}
    assert (asked, sync.stale, sync.gaps) == ([], 1, 0)


def test_a_gap_holds_batches_asks_for_a_snapshot_and_replays_what_follows_it():
    index = KvIndexer()
    asked: list[int] = []
    sync = EventSync(index, asked.append)
    sync.on_snapshot(A, KvSnapshot(A, 0, []))
    sync.on_batch(stored(A, 1, 1))
    sync.on_batch(stored(A, 3, 7))  # batch 2 was lost
    sync.on_batch(stored(A, 4, 8))
    assert asked == [A] and not sync.in_sync(A)
    assert index.overlaps(hashes(7)) == {}  # held back, not applied out of order
    # The worker holds 1, 5 (from the lost batch 2) and 7 as of batch 3.
    sync.on_snapshot(A, KvSnapshot(A, 3, [*hashes(1), *hashes(5), *hashes(7)]))
    assert sync.in_sync(A)
    assert index.overlaps(hashes(5)) == {A: 1}
    assert index.overlaps(hashes(8)) == {A: 1}  # batch 4 replayed after the snapshot
    sync.on_batch(stored(A, 5, 9))
    assert index.overlaps(hashes(9)) == {A: 1} and asked == [A]


def test_a_worker_first_seen_mid_stream_is_synchronised_from_a_snapshot():
    """What a freshly (re)started router sees: batch 40 of a worker it never heard of."""
    index = KvIndexer()
    asked: list[int] = []
    sync = EventSync(index, asked.append)
    sync.on_batch(stored(B, 40, 3))
    sync.on_batch(stored(B, 41, 4))  # one snapshot request, not two
    assert asked == [B]
    sync.on_snapshot(B, KvSnapshot(B, 40, hashes(3)))
    assert index.overlaps(hashes(3)) == {B: 1} and index.overlaps(hashes(4)) == {B: 1}


def test_router_resyncs_new_members_and_drops_departed_ones():
    async def run() -> None:
        asked: list[int] = []

        async def fetch(worker: int) -> KvSnapshot:
            asked.append(worker)
            return KvSnapshot(worker, 2, hashes(worker, 1))

        router = KvRouter(KvRouterConfig(block_size=BS), fetch, rng=random.Random(0))
        await router.wait_synced([A, B], 5)
        assert sorted(asked) == [A, B]
        assert router.indexer.overlaps(hashes(A, 1)) == {A: 2}
        router.on_events(encode(stored(A, 3, 7)))
        assert router.indexer.overlaps(hashes(7)) == {A: 1}
        router.route(prompt(9), [B], "x")  # A left discovery
        assert not router.indexer.knows(A) and router.indexer.overlaps(hashes(7)) == {}
        router.on_events(encode(stored(A, 4, 8)))  # a late frame of the departed worker
        assert not router.indexer.knows(A) and asked.count(A) == 1
        await router.close()

    asyncio.run(run())


# -- the worker side -------------------------------------------------------------------------


def test_publisher_numbers_batches_and_its_snapshot_matches_the_published_events():
    async def run() -> None:
        engine = MockerEngine(MockerConfig(block_size=BS, num_gpu_blocks=6, speedup_ratio=1000))
        sent: list[tuple[str, bytes]] = []

        async def publish(subject: str, payload: bytes) -> None:
            sent.append((subject, payload))

        publisher = KvPublisher(
            engine, publish, namespace="ns", component="Worker", worker_id=A, load_interval=0.01
        )
        publisher.start()
        for i in range(4):  # 4 prompts of 3 blocks each through 6 blocks: evictions
            publisher.note_request(f"r{i}")
            request = EngineRequest(f"r{i}", [*prompt(i, i, i), 1], SamplingParams(max_tokens=2))
            async for _ in engine.generate(request):
                pass
            publisher.note_finished(f"r{i}")
        snapshot = publisher.snapshot()
        await asyncio.sleep(0.05)
        await publisher.stop()
        await engine.stop()

        batches = [decode_batch(p) for s, p in sent if s == "servegrid.ns.kv_events.Worker"]
        assert [b.seq for b in batches] == list(range(1, len(batches) + 1))
        assert snapshot.seq == batches[-1].seq
        kinds = {e.kind for b in batches for e in b.events}
        assert kinds == {STORED, REMOVED}
        index = KvIndexer()
        for batch in batches:
            for event in batch.events:
                index.apply(A, event)
        assert index.blocks_of(A) == set(snapshot.block_hashes) == set(engine.cached_block_hashes())
        loads = [decode_load(p) for s, p in sent if s == "servegrid.ns.kv_load.Worker"]
        assert loads and all(r.worker_id == A for r in loads)
        assert [i for r in loads for i in r.received] == ["r0", "r1", "r2", "r3"]
        assert [i for r in loads for i in r.finished] == ["r0", "r1", "r2", "r3"]

    asyncio.run(run())


def test_two_routers_fed_the_same_frames_agree_even_when_one_lost_some():
    async def run() -> None:
        frames = [stored(A, 1, 1, 2), stored(B, 1, 1), stored(A, 2, 3), stored(B, 2, 4)]

        async def fetch(worker: int) -> KvSnapshot:  # what the workers hold after the frames
            held = {A: [*hashes(1, 2), *hashes(3)], B: [*hashes(1), *hashes(4)]}
            return KvSnapshot(worker, 2, held[worker])

        one = KvRouter(KvRouterConfig(block_size=BS), fetch)
        two = KvRouter(KvRouterConfig(block_size=BS), fetch)
        for router in (one, two):
            await router.wait_synced([A, B], 5)
        for frame in frames:
            one.on_events(encode(frame))
        two.on_events(encode(frames[3]))  # two saw only the last frame: stale, dropped
        for probe in (hashes(1, 2, 5), hashes(1, 4), hashes(3)):
            assert one.indexer.overlaps(probe) == two.indexer.overlaps(probe)
        assert one.indexer.overlaps(hashes(1, 2)) == {A: 2, B: 1}
        await one.close()
        await two.close()

    asyncio.run(run())
