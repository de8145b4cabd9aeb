"""Router cost: how long one KV routing decision takes, and how fast events are ingested.

    python bench/kv_router_cost.py          # 64 workers, 100,000 cached blocks (the figures)

The index is filled through the same path events take (encoded ``KvEventBatch`` frames fed
to ``KvRouter.on_events``), which gives the ingestion rate. Workers hold conversations that
share a system prompt, so lookups walk real shared prefixes. A decision is ``KvRouter.route``
on a prompt of ``--prompt-tokens`` tokens whose first half is a cached conversation: block
hashing, index walk, walk of the blocks this router's running requests use, cost of every
worker, choice. Workers report their load (the requests they received and finished) every
64 decisions, outside the timing. Hashing alone is timed too. On a shared
machine wall-clock percentiles include time the process was not running; the CPU time of
the deciding thread (``thread_time``) is printed beside them.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

from servegrid.engines.base import REMOVED, STORED, KvEvent
from servegrid.kv_router.config import KvRouterConfig
from servegrid.kv_router.protocol import KvEventBatch, KvSnapshot, LoadReport, encode
from servegrid.kv_router.router import KvRouter
from servegrid.llm.kv_hash import block_hashes


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=100_000, help="cached blocks in all")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--events-per-batch", type=int, default=4)
    args = parser.parse_args()
    bs = args.block_size
    rng = random.Random(1)

    router = KvRouter(KvRouterConfig(block_size=bs), rng=rng)
    workers = [rng.getrandbits(63) for _ in range(args.workers)]
    router.update_members(workers)
    for w in workers:  # known and in step, with nothing cached yet
        router.sync.on_snapshot(w, KvSnapshot(w, 0, []))

    # Conversations: a shared 256-token system prompt, then 1,024 tokens of their own.
    system = [rng.randrange(2048) for _ in range(256)]
    conversations: list[tuple[int, list[int]]] = []
    frames: list[bytes] = []
    seq = dict.fromkeys(workers, 0)
    own_blocks = 1024 // bs  # the system prompt's blocks count once per worker
    n_conversations = -(-(args.blocks - len(workers) * 256 // bs) // own_blocks)
    n_events = 0
    for i in range(n_conversations):
        w = workers[i % len(workers)]
        tokens = system + [rng.randrange(2048) for _ in range(1024)]
        hashes = block_hashes(tokens, bs)
        conversations.append((w, tokens))
        for start in range(0, len(hashes), args.events_per_batch * 4):
            chunk = hashes[start : start + args.events_per_batch * 4]
            events = [
                KvEvent(STORED, chunk[j : j + 4], (hashes[start + j - 1] if start + j else None))
                for j in range(0, len(chunk), 4)
            ]
            seq[w] += 1
            n_events += len(events)
            frames.append(encode(KvEventBatch(w, seq[w], events)))
    start = time.perf_counter()
    for frame in frames:
        router.on_events(frame)
    ingest = time.perf_counter() - start
    cached = sum(router.indexer.block_count(w) for w in workers)

    # Removal events cost the same path; measure a round of them on copies of real frames.
    removal_frames = []
    for w, tokens in conversations[: len(workers)]:
        hashes = block_hashes(tokens, bs)[-8:]
        seq[w] += 1
        removal_frames.append(encode(KvEventBatch(w, seq[w], [KvEvent(REMOVED, hashes)])))
    for frame in removal_frames:
        router.on_events(frame)

    half = args.prompt_tokens // 2
    prompts = []
    for _ in range(args.decisions):
        _, tokens = rng.choice(conversations)
        prompts.append(
            tokens[:half] + [rng.randrange(2048) for _ in range(args.prompt_tokens - half)]
        )
    # Every worker reports its load (so the router tracks which prompt blocks are in use
    # there); every 64 decisions each reports the requests it received and finished since.
    for w in workers:
        router.on_load(encode(LoadReport(w, 0, 8192, 0, 0)))
    sent: dict[int, list[str]] = {w: [] for w in workers}
    decision_cpu_us: list[float] = []
    decision_us: list[float] = []
    hashing_us: list[float] = []
    overlap = 0
    for i, tokens in enumerate(prompts):
        c0 = time.thread_time_ns()
        t0 = time.perf_counter()
        decision = router.route(tokens, workers, f"r{i}")
        t1 = time.perf_counter()
        decision_cpu_us.append((time.thread_time_ns() - c0) / 1000)
        block_hashes(tokens, bs)
        t2 = time.perf_counter()
        decision_us.append((t1 - t0) * 1e6)
        hashing_us.append((t2 - t1) * 1e6)
        overlap += decision.overlap_blocks
        sent[decision.worker_id].append(f"r{i}")
        if i % 64 == 63:
            for w, ids in sent.items():
                active = rng.randrange(2048)
                router.on_load(encode(LoadReport(w, active, 8192, len(ids), 0, ids, ids)))
                ids.clear()

    print(
        f"{args.workers} workers, {cached:,} cached blocks ({len(router.indexer._holders):,} "
        f"distinct), prompts of {args.prompt_tokens} tokens ({args.prompt_tokens // bs} blocks, "
        f"half cached), {args.decisions:,} decisions"
    )
    print("| figure | value |")
    print("|---|---|")
    print(
        f"| decision p50 / p99 | {percentile(decision_us, 0.5):.0f} / "
        f"{percentile(decision_us, 0.99):.0f} µs |"
    )
    print(
        f"| decision CPU time p50 / p99 | {percentile(decision_cpu_us, 0.5):.0f} / "
        f"{percentile(decision_cpu_us, 0.99):.0f} µs |"
    )
    print(
        f"| of which hashing the prompt, p50 / p99 | {percentile(hashing_us, 0.5):.0f} / "
        f"{percentile(hashing_us, 0.99):.0f} µs |"
    )
    print(f"| mean overlap found | {overlap / len(prompts):.1f} blocks |")
    print(
        f"| event ingestion | {n_events / ingest:,.0f} events/s "
        f"({cached / ingest:,.0f} blocks/s, {len(frames) / ingest:,.0f} frames/s) |"
    )
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
