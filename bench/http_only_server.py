"""Measure the HTTP layer alone: ``OpenAIHttpServer`` over a backend that answers instantly.

The backend yields one chunk of ``--tokens`` tokens (or one chunk a token with ``--per-token``),
so what the server costs is the HTTP layer: parse, validate, encode, write. On SIGINT/SIGTERM
(or after ``--duration``) it prints the process CPU seconds it spent while serving generation
requests and the CPU microseconds per request. Load it with ``bench/loadgen.py``::

    python bench/http_only_server.py --port 8901 &
    python bench/loadgen.py --url http://127.0.0.1:8901 --requests 20000 --concurrency 32
    kill -INT %1
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import sys

from servegrid.http.server import OpenAIHttpServer
from servegrid.llm.protocol import GenerateChunk, TextRequest

MODEL = "bench-model"


class InstantBackend:
    def __init__(self, tokens: int, per_token: bool) -> None:
        self.tokens = tokens
        self.per_token = per_token

    def models(self) -> list[str]:
        return [MODEL]

    async def generate(self, request: TextRequest):
        n = min(self.tokens, request.max_tokens or self.tokens)
        if self.per_token:
            for i in range(n):
                yield GenerateChunk(
                    text=" tok",
                    completion_tokens=i + 1,
                    prompt_tokens=8 if i == 0 else 0,
                    finish_reason="length" if i == n - 1 else None,
                )
        else:
            yield GenerateChunk(
                text=" tok" * n, completion_tokens=n, prompt_tokens=8, finish_reason="length"
            )


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _main(args: argparse.Namespace) -> None:
    server = OpenAIHttpServer(InstantBackend(args.tokens, args.per_token), args.host, args.port)
    await server.start()
    print(f"listening on {args.host}:{server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    cpu0 = _cpu_s()
    try:
        await asyncio.wait_for(stop.wait(), args.duration)
    except TimeoutError:
        pass
    cpu = _cpu_s() - cpu0
    requests = sum(
        v
        for (endpoint, _), v in server.metrics.requests.values.items()
        if endpoint.startswith("/v1/")
    )
    await server.stop(timeout_s=5)
    per = cpu / requests * 1e6 if requests else float("nan")
    print(
        f"served {requests:.0f} requests, server CPU {cpu:.2f} s, {per:.1f} us/request", flush=True
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="http_only_server", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8901)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--per-token", action="store_true", help="one chunk per token")
    p.add_argument("--duration", type=float, default=600.0, help="exit after this many seconds")
    p.add_argument("--no-uvloop", action="store_true")
    args = p.parse_args(argv)
    if args.no_uvloop:
        asyncio.run(_main(args))
    else:
        import uvloop

        uvloop.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
