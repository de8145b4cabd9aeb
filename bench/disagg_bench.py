"""Aggregated vs disaggregated serving on the same budget, long prompts, realistic timing.

    python bench/disagg_bench.py                      # both graphs, the tracked scenario
    python bench/disagg_bench.py --requests 200 --concurrency 16 --prompt-words 2000

Four mocker "GPUs" either way: configs/agg.yaml with 4 Workers, or configs/disagg.yaml with 2
decode Workers + 2 PrefillWorkers. The mocker runs at speedup 1 (a ~1B model on an H100: a
2,000-token prefill takes ~63 ms, a decode step ~3-5 ms) and sizes KV transfers from a
Llama-3.2-1B-shaped config.json (16 layers, 8 KV heads of 64, bf16: 32 KiB a token) at the
configured kv-transfer-bandwidth (25 GB/s). Every prompt is unique (no prefix-cache help).

A streaming client records per request the time to the first token, the inter-token latency
((last token time - first token time) / (tokens - 1), as loadgen.py defines it) and the
longest stall between two streamed events (what a prefill scheduled beside a decode costs it).
p50/p99 are over requests. Each run is bounded by --requests (after --warmup).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from graph_bench import wait_healthy  # noqa: E402
from servegrid.distributed.embedded_nats import free_port  # noqa: E402
from servegrid.llm.model_init import BUILTIN_MODEL, ensure_model  # noqa: E402

LLAMA_1B_KV = {
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_size": 2048,
    "head_dim": 64,
    "torch_dtype": "bfloat16",
}
WORDS = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot"
).split()


def model_dir(root: Path) -> Path:
    """The built-in tokenizer with a 1B-llama-shaped config.json (the KV transfer's size)."""
    target = root / "tiny-chat-1b-kv"
    shutil.copytree(ensure_model(BUILTIN_MODEL), target)
    config = json.loads((target / "config.json").read_text())
    config.update(LLAMA_1B_KV)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def graph_args(kind: str, model: Path, port: int) -> list[str]:
    common = [
        f"--Frontend.port={port}",
        "--Frontend.host=127.0.0.1",
        f"--Processor.model={model}",
        f"--Worker.model={model}",
        "--Worker.speedup-ratio=1",
    ]
    if kind == "agg":
        return ["-f", str(REPO / "configs/agg.yaml"), *common, "--Worker.ServiceArgs.workers=4"]
    return [
        "-f",
        str(REPO / "configs/disagg.yaml"),
        *common,
        "--Worker.ServiceArgs.workers=2",
        f"--PrefillWorker.model={model}",
        "--PrefillWorker.speedup-ratio=1",
        "--PrefillWorker.ServiceArgs.workers=2",
    ]


@dataclass
class Results:
    ttfts: list[float] = field(default_factory=list)
    itls: list[float] = field(default_factory=list)  # per request: (last - first) / (tokens - 1)
    stalls: list[float] = field(default_factory=list)  # per request: its longest gap
    output_tokens: int = 0
    prompt_tokens: int = 0
    ok: int = 0
    failed: int = 0


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] * 1000


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, out: Results
) -> None:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    times: list[float] = []
    usage = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                out.failed += 1
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = event["usage"]
                if event.get("choices") and event["choices"][0].get("text"):
                    times.append(time.perf_counter())
    except httpx.HTTPError:
        out.failed += 1
        return
    if not times or usage is None:
        out.failed += 1
        return
    out.ok += 1
    out.ttfts.append(times[0] - t0)
    tokens = usage["completion_tokens"]
    if tokens > 1:
        out.itls.append((times[-1] - times[0]) / (tokens - 1))
    out.stalls.append(max((b - a for a, b in itertools.pairwise(times)), default=0.0))
    out.output_tokens += tokens
    out.prompt_tokens += usage["prompt_tokens"]


async def load(
    url: str, requests: int, warmup: int, concurrency: int, words: int, max_tokens: int
) -> tuple[Results, float]:
    rng = random.Random(7)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(requests + warmup)]
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
        model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]

        async def run(batch: list[str], out: Results) -> float:
            todo = iter(batch)

            async def caller() -> None:
                for prompt in todo:
                    await one_request(client, url, model, prompt, max_tokens, out)

            started = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(concurrency)))
            return time.perf_counter() - started

        await run(prompts[:warmup], Results())
        measured = Results()
        wall = await run(prompts[warmup:], measured)
    return measured, wall


def serve_and_load(kind: str, model: Path, args: argparse.Namespace) -> tuple[Results, float]:
    port = free_port()
    env = {
        **os.environ,
        "SERVEGRID_DISCOVERY_DIR": tempfile.mkdtemp(prefix="disagg-bench-"),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("NATS_SERVER", None)
    env.pop("ETCD_ENDPOINTS", None)
    log = open(Path(env["SERVEGRID_DISCOVERY_DIR"]) / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "servegrid.cli", "serve", *graph_args(kind, model, port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        time.sleep(3)  # every worker registered
        shape = (args.concurrency, args.prompt_words, args.max_tokens)
        return asyncio.run(load(url, args.requests, args.warmup, *shape))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if kind == "disagg":
            lines = Path(log.name).read_text().splitlines()
            print(f"  disagg: {sum('prefilled ' in line for line in lines)} remote prefills logged")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # The tracked scenario: ~2,100-token prompts (1,200 words), 64 tokens out, 8 at a time.
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt-words", type=int, default=1200)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--graphs", default="agg,disagg")
    args = parser.parse_args()
    if not 1 <= args.requests <= 5000 or not 1 <= args.concurrency <= 256:
        raise SystemExit("--requests must be 1..5000 and --concurrency 1..256")
    with tempfile.TemporaryDirectory() as root:
        model = model_dir(Path(root))
        rows = []
        for kind in args.graphs.split(","):
            print(f"serving {kind} ...", flush=True)
            result, wall = serve_and_load(kind, model, args)
            rows.append((kind, result, wall))
    print(
        "| graph | ok/failed | prompt tok (mean) | TTFT p50 / p99 ms | ITL p50 / p99 ms "
        "| longest stall p50 / p99 ms | out tok/s | req/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind, r, wall in rows:
        mean_prompt = r.prompt_tokens / max(r.ok, 1)
        print(
            f"| {kind} | {r.ok}/{r.failed} | {mean_prompt:.0f} "
            f"| {pct(r.ttfts, 50):.0f} / {pct(r.ttfts, 99):.0f} "
            f"| {pct(r.itls, 50):.1f} / {pct(r.itls, 99):.1f} "
            f"| {pct(r.stalls, 50):.0f} / {pct(r.stalls, 99):.0f} "
            f"| {r.output_tokens / wall:.0f} | {r.ok / wall:.2f} |"
        )


if __name__ == "__main__":
    main()
