"""The request plane alone: CPU per call of a unary and a streaming endpoint on loopback.

    python bench/request_plane_bench.py                 # no secret (one host)
    python bench/request_plane_bench.py --secret        # with the cluster secret's handshake

Client and server run in one process on uvloop, so "CPU µs per call" is both ends together:
encode, write, read, decode, dispatch, on one shared connection with ``--concurrency``
callers. CPU time, not wall time, is the figure to compare: it barely moves when other
processes share the cores, while calls/s does. Every run is bounded by ``--calls``.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import uvloop

from servegrid.distributed.transport.client import ConnectionPool
from servegrid.distributed.transport.server import RequestPlaneServer

SECRET = "request-plane-bench-secret-0123456789"


async def add(pair: list[int]) -> int:
    return pair[0] + pair[1]


async def count(n: int):
    for i in range(n):
        yield i


async def run(args: argparse.Namespace) -> None:
    # Keyword only when asked for, so the script also measures versions without a handshake.
    options = {"secret": SECRET} if args.secret else {}
    server = RequestPlaneServer("127.0.0.1", 0, **options)
    server.add_handler("add", add)
    server.add_handler("count", count)
    await server.start()
    pool = ConnectionPool(**options)
    conn = await pool.get(1, "127.0.0.1", server.port)

    async def unary(calls: int) -> None:
        for i in range(calls):
            assert await conn.call("add", [i, 1]).single() == i + 1

    async def stream(calls: int) -> None:
        for _ in range(calls):
            received = 0
            async for _item in conn.call("count", args.items):
                received += 1
            assert received == args.items

    try:
        for name, worker, total in [
            ("unary", unary, args.calls),
            (f"stream of {args.items}", stream, args.calls // args.items * 4),
        ]:
            per_caller = max(total // args.concurrency, 1)
            await asyncio.gather(*[worker(10) for _ in range(args.concurrency)])  # warm-up
            cpu0, wall0 = time.process_time(), time.perf_counter()
            await asyncio.gather(*[worker(per_caller) for _ in range(args.concurrency)])
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            calls = per_caller * args.concurrency
            print(
                f"{name:>14}: {cpu / calls * 1e6:6.1f} µs CPU per call, "
                f"{calls / wall:9,.0f} calls/s ({calls} calls)"
            )
    finally:
        pool.close()
        await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=48_000, help="unary calls to measure")
    parser.add_argument("--items", type=int, default=32, help="items per streamed call")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--secret", action="store_true", help="authenticate the connection")
    uvloop.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
