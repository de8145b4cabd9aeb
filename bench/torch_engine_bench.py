"""The torch engine on CPU: prefill and decode tokens/s, and KV-transfer GB/s over loopback.

    .venv/bin/python bench/torch_engine_bench.py [--model DIR] [--device cpu] [--json]

Runs the engine in process (no serving graph), so the figures are the engine's own:

- prefill: one prompt of ``--prompt-tokens`` at a time, ``max_tokens=1``, prefix caching off;
  prompt tokens / wall time.
- decode: ``--batch`` sequences at once after their (short) prefill, ``--decode-tokens`` each;
  generated tokens / wall time of the decode phase (first token excluded).
- KV transfer: a prefill engine ships a prompt's KV blocks to a decode engine's reserved
  blocks over ``servegrid.kv_transfer`` (loopback TCP); bytes / wall time of ``send_kv``
  alone (the prefill is not timed). The tiny model holds 4 KiB a token, so a transfer of
  ``--transfer-tokens`` of 4,000 tokens moves 250 blocks, 15.6 MiB.

Every loop is bounded by ``--rounds``. The model defaults to the tiny random Llama that
``servegrid model init`` writes (built in a temporary directory).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from servegrid.engines.base import EngineRequest, SamplingParams
from servegrid.engines.registry import create_engine
from servegrid.engines.torch import TorchEngine
from servegrid.kv_transfer import KvReceiver, send_kv
from servegrid.llm.model_init import init_model


def engine_for(model: Path, device: str, **extra) -> TorchEngine:
    config = {"model": str(model), "device": device, "max-model-len": 4096, **extra}
    engine = create_engine("torch", config)
    assert isinstance(engine, TorchEngine)
    return engine


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 2000 + 3 for i in range(n)]


async def drain(engine: TorchEngine, request: EngineRequest) -> list[float]:
    """Arrival time of each output token."""
    times: list[float] = []
    async for out in engine.generate(request):
        times.extend(time.perf_counter() for _ in out.token_ids)
    return times


async def bench_prefill(engine: TorchEngine, tokens: int, rounds: int) -> float:
    rates = []
    for r in range(rounds):
        request = EngineRequest(f"pf{r}", prompt(r, tokens), SamplingParams(max_tokens=1))
        start = time.perf_counter()
        await drain(engine, request)
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


async def bench_decode(engine: TorchEngine, batch: int, tokens: int, rounds: int) -> float:
    rates = []
    for r in range(rounds):
        requests = [
            EngineRequest(f"dc{r}-{i}", prompt(1000 + r * batch + i, 32), SamplingParams(tokens))
            for i in range(batch)
        ]
        streams = await asyncio.gather(*(drain(engine, q) for q in requests))
        first = max(t[0] for t in streams)  # every sequence is decoding from here on
        last = max(t[-1] for t in streams)
        counted = sum(sum(1 for x in t if x > first) for t in streams)
        rates.append(counted / (last - first))
    return statistics.median(rates)


async def bench_transfer(
    prefill: TorchEngine, decode: TorchEngine, tokens: int, rounds: int
) -> tuple[float, int]:
    receiver = KvReceiver(decode, "127.0.0.1", "127.0.0.1")
    await receiver.start()
    rates = []
    size = 0
    try:
        for r in range(rounds):
            request = EngineRequest(f"kv{r}", prompt(5000 + r, tokens), SamplingParams(1))
            reservation = decode.reserve_kv(request)
            assert reservation is not None, "the decode engine has no room"
            target, arrived = receiver.expect(reservation)
            kv = await prefill.prefill_kv(request, target.first_token, target.num_tokens)
            size = sum(len(s) for s in kv.segments)
            start = time.perf_counter()
            try:
                await send_kv(target, kv)
            finally:
                kv.release()
            await arrived
            rates.append(size / (time.perf_counter() - start) / 1e9)
            decode.release_kv(reservation)
    finally:
        await receiver.stop()
    return statistics.median(rates), size


async def main(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or init_model(Path(tmp) / "tiny")
        # Prefix caching off: repeated rounds must compute, not hit the cache.
        engine = engine_for(
            model,
            args.device,
            **{"enable-prefix-caching": False, "max-num-batched-tokens": args.prompt_tokens},
        )
        await engine.start()
        try:
            prefill_rate = await bench_prefill(engine, args.prompt_tokens, args.rounds)
            decode_rates = {
                b: await bench_decode(engine, b, args.decode_tokens, args.rounds)
                for b in args.batch
            }
        finally:
            await engine.stop()
        blocks = 2 * -(-args.transfer_tokens // 16) + 16
        prefill_engine = engine_for(model, args.device, **{"num-gpu-blocks": blocks})
        decode_engine = engine_for(model, args.device, **{"num-gpu-blocks": blocks})
        await prefill_engine.start()
        await decode_engine.start()
        try:
            gbps, size = await bench_transfer(
                prefill_engine, decode_engine, args.transfer_tokens, args.rounds
            )
        finally:
            await prefill_engine.stop()
            await decode_engine.stop()
    return {
        "device": args.device,
        "prefill_tokens_per_s": round(prefill_rate),
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens_per_s": {str(b): round(r) for b, r in decode_rates.items()},
        "kv_transfer_gb_per_s": round(gbps, 2),
        "kv_transfer_bytes": size,
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a local HF model directory")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--transfer-tokens", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 100:
        parser.error("--rounds must be 1..100")
    return args


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    result = asyncio.run(main(arguments))
    if arguments.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
