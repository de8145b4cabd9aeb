"""What one KV transfer costs on the bulk path, alone: latency of descriptor-only transfers
(the mocker's: handshake, header, replies) and throughput of transfers that ship real bytes.

Two mocker engines in this process: a decode engine behind a ``KvReceiver`` on loopback and a
prefill engine that computes the KV and sends it with ``send_kv``, one transfer at a time.

    .venv/bin/python bench/kv_transfer_bench.py                    # 500 descriptor transfers
    .venv/bin/python bench/kv_transfer_bench.py --bytes --tokens 2000 --count 50
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from servegrid.engines.base import EngineRequest, SamplingParams
from servegrid.engines.mocker import create
from servegrid.kv_transfer import KvReceiver, send_kv
from servegrid.sdk.host import install_uvloop


async def run(count: int, tokens: int, real_bytes: bool) -> None:
    config = {"speedup-ratio": 1e6, "kv-transfer-bytes": real_bytes, "max-model-len": 8192}
    decode, prefill = create(config), create(config)
    await decode.start()
    await prefill.start()
    receiver = KvReceiver(decode, "127.0.0.1", "127.0.0.1")
    await receiver.start()
    latencies: list[float] = []
    moved = 0
    try:
        for n in range(count):
            prompt = [n % 1000 + 3, *range(5, 5 + tokens)]  # a fresh first block each
            request = EngineRequest(f"r{n}", prompt, SamplingParams(max_tokens=1))
            reservation = decode.reserve_kv(request)
            assert reservation is not None, "the decode engine has no room"
            target, arrived = receiver.expect(reservation)
            kv = await prefill.prefill_kv(request, target.first_token, target.num_tokens)
            started = time.perf_counter()
            await send_kv(target, kv)  # no simulated link time: the loopback's own
            await arrived
            latencies.append(time.perf_counter() - started)
            moved += sum(len(s) for s in kv.segments)
            decode.release_kv(reservation)
    finally:
        await receiver.stop()
        await decode.stop()
        await prefill.stop()
    latencies.sort()
    p50 = statistics.median(latencies) * 1e3
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1e3
    line = f"{count} transfers of {tokens} tokens: p50 {p50:.2f} ms, p99 {p99:.2f} ms"
    if real_bytes:
        line += f", {moved / sum(latencies) / 1e6:.0f} MB/s ({moved / count / 1e6:.1f} MB each)"
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--bytes", action="store_true", help="ship the KV's bytes for real")
    args = parser.parse_args()
    install_uvloop()  # as the service processes run
    asyncio.run(run(args.count, args.tokens, args.bytes))


if __name__ == "__main__":
    main()
