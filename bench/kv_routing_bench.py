"""Routing quality: a shared-prefix multi-turn workload under kv, round-robin and random.

    python bench/kv_routing_bench.py                       # the figures in bench/README.md
    python bench/kv_routing_bench.py --users 16 --turns 4  # quicker

For each router mode it serves ``configs/agg_router.yaml`` afresh (``--workers`` mocker workers
with ``--gpu-blocks`` KV blocks each: small enough that placement matters), then runs the
same trace: ``--users`` conversations run at once, each ``--turns`` turns over one shared
system prompt; a turn's prompt is the system prompt, the conversation so far and a new
question, so turns of different users interleave and every turn extends its user's prefix.
Sampling is seeded, so every mode sees the same text. It prints per mode: the prefix-cache
hit rate (cached prompt tokens / prompt tokens, from ``usage.prompt_tokens_details``), TTFT
p50/p99 (streamed, first text event), requests/s and output tokens/s; then the hit rates of
two offline placements of the recorded trace with perfect knowledge of every cache
(``oracle``): the best of them is the reference the kv router is measured against.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from graph_bench import wait_healthy  # noqa: E402
from servegrid.distributed.embedded_nats import free_port  # noqa: E402

CONFIG = REPO / "configs" / "agg_router.yaml"
MODEL = "servegrid/tiny-chat"
WORDS = (
    "parcel delivery window customs form return label warehouse courier tracking number "
    "address invoice refund weight box pallet route driver depot signature damage claim "
    "insurance express standard overnight pickup dropoff locker schedule holiday weekend"
).split()


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@dataclass
class Turn:
    user: int
    index: int  # 0 for a conversation's first turn
    prompt: str
    sent: float = 0.0  # seconds from the start of the run
    done: float = 0.0
    ttft: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    answer: str = ""


@dataclass
class ModeResult:
    mode: str
    turns: list[Turn] = field(default_factory=list)
    wall: float = 0.0
    errors: int = 0

    def hit_rate(self, first_turn: int = 0) -> float:
        turns = [t for t in self.turns if t.index >= first_turn]
        prompt = sum(t.prompt_tokens for t in turns)
        return sum(t.cached_tokens for t in turns) / max(prompt, 1)

    def ttft_ms(self, q: float) -> float:
        values = sorted(t.ttft for t in self.turns)
        return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else 0.0


async def one_turn(client: httpx.AsyncClient, turn: Turn, max_tokens: int, seed: int) -> str:
    body = {
        "model": MODEL,
        "prompt": turn.prompt,
        "max_tokens": max_tokens,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    reply = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            choices = event.get("choices") or []
            if choices and choices[0].get("text"):
                if not turn.ttft:
                    turn.ttft = time.perf_counter() - start
                reply.append(choices[0]["text"])
            usage = event.get("usage")
            if usage:
                turn.prompt_tokens = usage["prompt_tokens"]
                turn.cached_tokens = (usage.get("prompt_tokens_details") or {}).get(
                    "cached_tokens", 0
                )
                turn.output_tokens = usage["completion_tokens"]
    return "".join(reply)


async def run_trace(url: str, args: argparse.Namespace, mode: str) -> ModeResult:
    result = ModeResult(mode)
    rng = random.Random(args.seed)
    system = "System: " + text(rng, args.system_words) + "\n"
    questions = [
        [text(rng, args.question_words) for _ in range(args.turns)] for _ in range(args.users)
    ]

    async def user(u: int, client: httpx.AsyncClient) -> None:
        history = system
        for t in range(args.turns):
            prompt = f"{history}User {u}: {questions[u][t]}\nAssistant:"
            turn = Turn(u, t, prompt, sent=time.perf_counter() - start)
            result.turns.append(turn)  # issue order: the trace the oracle replays
            try:
                answer = await one_turn(client, turn, args.max_tokens, seed=u * 1000 + t)
            except (httpx.HTTPError, RuntimeError) as exc:
                result.errors += 1
                print(f"{mode}: user {u} turn {t}: {exc}", file=sys.stderr)
                return
            turn.done = time.perf_counter() - start
            turn.answer = answer
            history = f"{prompt}{answer}\n"

    limits = httpx.Limits(max_connections=args.users + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.wait_for(
            asyncio.gather(*(user(u, client) for u in range(args.users))), args.time_limit
        )
        result.wall = time.perf_counter() - start
    return result


def serve(args: argparse.Namespace, mode: str, port: int, discovery: str) -> subprocess.Popen:
    env = {**os.environ, "SERVEGRID_DISCOVERY_DIR": discovery, "SERVEGRID_LOG_LEVEL": "WARNING"}
    command = [
        sys.executable, "-m", "servegrid.cli", "serve", "-f", str(CONFIG),
        f"--Frontend.port={port}", "--Frontend.host=127.0.0.1",
        f"--Router.router-mode={mode}",
        f"--Worker.speedup-ratio={args.speedup}", f"--Worker.ServiceArgs.workers={args.workers}",
        f"--Worker.num-gpu-blocks={args.gpu_blocks}",
    ]  # fmt: skip
    if mode == "kv":
        command += [f"--Router.{setting}" for setting in args.router_setting]
    return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def wait_workers(url: str, workers: int, timeout: float = 60.0) -> None:
    """Until the router has routed to every worker once (each has registered)."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    with httpx.Client(base_url=url, timeout=30) as client:
        i = 0
        while len(seen) < workers:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(seen)} of {workers} workers answered in {timeout}s")
            body = {"model": MODEL, "prompt": f"warm {i}", "max_tokens": 1}
            client.post("/v1/completions", json=body)
            metrics = client.get("/metrics").text
            seen = {
                line.split('worker="')[1].split('"')[0]
                for line in metrics.splitlines()
                if line.startswith("servegrid_frontend_routed_requests_total{")
            }
            i += 1


# -- the offline oracles ----------------------------------------------------------------------
#
# Both place the recorded trace knowing every cache exactly, under two policies: ``greedy``
# sends each prompt where most of it is cached (ties: the least loaded worker), ``sticky``
# keeps each user on one worker (users dealt round-robin). Both reuse the full blocks of a
# prompt but its last token, as the engine does. They differ in what they let a cache do:
#
# - ``fair`` replays the trace in the time order it was served through the mocker's own
#   block pool (``BlockPool``: same capacity, blocks pinned while their request runs, tail-
#   first LRU eviction). A turn reaches its worker one full-prompt prefill step (the
#   mocker's timing model) before its recorded first token, its prompt blocks are findable
#   from that first token on, and the blocks of its answer are cached when it ends (the
#   next turn's prompt starts with them when the answer re-tokenizes the same). A turn that
#   arrives while the one it could share with is still prefilling finds nothing, as on a
#   real worker. This is the reference the router is measured against.
# - ``sequential`` (the earlier oracle) replays one turn at a time through plain LRU caches:
#   nothing is pinned or in flight, so simultaneous turns find each other's blocks; its
#   greedy placement, blind to time, can come out below the fair one.


def token_ids(trace: list[Turn]) -> tuple[list[list[int]], list[list[int]]]:
    """Per turn: the prompt's ids, and the ids of prompt + answer as far as they extend it."""
    from servegrid.llm.model_init import ensure_model
    from servegrid.llm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ensure_model(MODEL))
    prompts = [tokenizer.encode(t.prompt) for t in trace]
    sequences = []
    for turn, ids in zip(trace, prompts, strict=True):
        whole = tokenizer.encode(turn.prompt + turn.answer)
        sequences.append(whole if whole[: len(ids)] == ids else ids)
    return prompts, sequences


def fair_oracle(
    trace: list[Turn], prompts: list[list[int]], sequences: list[list[int]], workers: int,
    capacity: int, block_size: int, speedup: float, policy: str,
) -> tuple[float, float]:  # fmt: skip
    from servegrid.engines.mocker.kv_cache import BlockPool
    from servegrid.engines.mocker.timing import step_seconds
    from servegrid.llm.kv_hash import block_hashes

    pools = [BlockPool(capacity) for _ in range(workers)]
    placed: dict[int, tuple[int, list[int], list[int]]] = {}  # turn -> worker, blocks, hashes
    events = []  # (time, order at equal times, what, turn)
    for i, turn in enumerate(trace):
        if turn.done:  # served (an errored turn has no end)
            first_token = turn.sent + turn.ttft
            prefill = step_seconds(len(prompts[i]), 0, 0, speedup)
            events.append((max(turn.sent, first_token - prefill), 1, "arrive", i))
            events += [(first_token, 2, "prefilled", i), (turn.done, 0, "finish", i)]
    events.sort()
    cached = [0, 0]  # all turns, turns after the first
    total = [0, 0]
    fake = 1 << 63  # hashes of generated blocks: never asked for again
    for _, _, what, i in events:
        turn, ids = trace[i], prompts[i]
        if what == "arrive":
            hashes = block_hashes(ids, block_size)
            usable = hashes[: (len(ids) - 1) // block_size]
            if policy == "sticky":
                w = turn.user % workers
            else:
                w = max(
                    range(workers),
                    key=lambda k: (hit_blocks(pools[k].cached, usable), -pools[k].num_active),
                )
            pool = pools[w]
            blocks = pool.acquire_prefix(usable)
            hit = len(blocks) * block_size
            need = -(-(len(ids) + turn.output_tokens) // block_size) - len(blocks)
            for _ in range(min(need, pool.num_available)):  # beyond that: as if it fitted
                blocks.append(pool.allocate())
            placed[i] = (w, blocks, hashes)
            cached[0] += hit
            total[0] += len(ids)
            if turn.index:
                cached[1] += hit
                total[1] += len(ids)
        elif what == "prefilled":
            w, blocks, hashes = placed[i]
            for block, h in zip(blocks, hashes, strict=False):
                pools[w].commit(block, h)
        else:
            # The engine caches every full block of computed tokens (all but the last one).
            w, blocks, hashes = placed.pop(i)
            full = (len(ids) + turn.output_tokens - 1) // block_size
            answer = block_hashes(sequences[i], block_size)
            for b in range(len(hashes), min(full, len(blocks))):
                if b < len(answer):
                    pools[w].commit(blocks[b], answer[b])
                else:
                    fake += 1
                    pools[w].commit(blocks[b], fake)
            pools[w].release(blocks)
            pools[w].removed.clear()
    return cached[0] / max(total[0], 1), cached[1] / max(total[1], 1)


def hit_blocks(cached: dict[int, int], hashes: list[int]) -> int:
    n = 0
    for h in hashes:
        if h not in cached:
            break
        n += 1
    return n


class LruCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def use(self, hashes: list[int]) -> None:
        for h in hashes:
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)


def sequential_oracle(
    trace: list[Turn], prompts: list[list[int]], sequences: list[list[int]], workers: int,
    capacity: int, block_size: int, speedup: float, policy: str,
) -> tuple[float, float]:  # fmt: skip
    from servegrid.llm.kv_hash import block_hashes

    caches = [LruCache(capacity) for _ in range(workers)]
    placed = [0] * workers
    cached = [0, 0]
    total = [0, 0]
    for i, (turn, ids) in enumerate(zip(trace, prompts, strict=True)):
        hashes = block_hashes(ids, block_size)
        usable = hashes[: (len(ids) - 1) // block_size]
        if policy == "greedy":
            w = max(
                range(workers), key=lambda i: (hit_blocks(caches[i].blocks, usable), -placed[i])
            )
        else:
            w = turn.user % workers
        hit = hit_blocks(caches[w].blocks, usable) * block_size
        cached[0] += hit
        total[0] += len(ids)
        if turn.index:
            cached[1] += hit
            total[1] += len(ids)
        caches[w].use(block_hashes(sequences[i], block_size))
        placed[w] += len(hashes)
    return cached[0] / max(total[0], 1), cached[1] / max(total[1], 1)


def oracles(
    trace: list[Turn], workers: int, capacity: int, block_size: int, speedup: float
) -> dict[str, dict[str, tuple[float, float]]]:
    """Hit rates (all turns, turns 2+) per oracle and placement policy."""
    prompts, sequences = token_ids(trace)
    return {
        name: {
            policy: replay(
                trace, prompts, sequences, workers, capacity, block_size, speedup, policy
            )
            for policy in ("greedy", "sticky")
        }
        for name, replay in (("fair", fair_oracle), ("sequential", sequential_oracle))
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", default="kv,round-robin,random")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--gpu-blocks", type=int, default=512, help="KV blocks per worker")
    parser.add_argument("--speedup", type=float, default=1.0, help="mocker speedup-ratio")
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--system-words", type=int, default=300)
    parser.add_argument("--question-words", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds per mode")
    parser.add_argument(
        "--router-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Router key for the kv mode, e.g. overlap-score-weight=2 (repeatable)",
    )
    parser.add_argument("--save-trace", metavar="PATH", help="write each mode's turns as JSON")
    parser.add_argument(
        "--from-trace", metavar="PATH", help="serve nothing: report a --save-trace file again"
    )
    parser.add_argument("--show-routing", action="store_true", help="print routing metrics")
    args = parser.parse_args()

    results: list[ModeResult] = []
    if args.from_trace:
        saved = json.loads(Path(args.from_trace).read_text())
        for mode, r in saved.items():
            turns = [Turn(**t) for t in r["turns"]]
            results.append(ModeResult(mode, turns, r["wall"], r["errors"]))
    for mode in args.modes.split(",") if not args.from_trace else ():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        discovery = tempfile.mkdtemp(prefix="servegrid-kvbench-")
        proc = serve(args, mode, port, discovery)
        try:
            wait_healthy(url, proc)
            wait_workers(url, args.workers)
            results.append(asyncio.run(run_trace(url, args, mode)))
            if args.show_routing:
                metrics = httpx.get(f"{url}/metrics", timeout=10).text
                print(mode, [m for m in metrics.splitlines() if "route" in m and "#" not in m])
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    print(
        f"{args.workers} mocker workers x{args.speedup:g}, {args.gpu_blocks} KV blocks each; "
        f"{args.users} users x {args.turns} turns, system prompt {args.system_words} words, "
        f"{args.question_words}-word questions, {args.max_tokens} output tokens"
    )
    print(
        "| mode | hit rate, all turns | hit rate, turns 2+ | TTFT p50 / p99 ms | req/s "
        "| out tok/s | errors |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        out = sum(t.output_tokens for t in r.turns)
        print(
            f"| {r.mode} | {r.hit_rate():.1%} | {r.hit_rate(1):.1%} | "
            f"{r.ttft_ms(0.5):.1f} / {r.ttft_ms(0.99):.1f} | "
            f"{len(r.turns) / r.wall:.1f} | {out / r.wall:,.0f} | {r.errors} |"
        )
    if args.save_trace:
        Path(args.save_trace).write_text(
            json.dumps(
                {
                    r.mode: {
                        "wall": r.wall,
                        "errors": r.errors,
                        "turns": [vars(t) for t in r.turns],
                    }
                    for r in results
                }
            )
        )
    trace = results[0].turns
    for name, rates in oracles(trace, args.workers, args.gpu_blocks, 16, args.speedup).items():
        best = max(rates.values(), key=lambda r: r[1])
        print(
            f"| oracle, {name} (trace of {results[0].mode}; best of greedy / sticky) | "
            f"{best[0]:.1%} | {best[1]:.1%} | | | | |"
        )
        placements = ", ".join(f"{p} {a:.1%} / {b:.1%}" for p, (a, b) in rates.items())
        print(f"  {name} oracle placements (all turns / turns 2+): {placements}")
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
